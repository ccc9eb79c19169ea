"""`python -m tests.gcs_emulator start --port=P ...`: gcp-storage-emulator (a local GCS)
with two behaviours of GCS that tensorstore, which writes orbax's arrays, relies on and
the emulator lacks: a media download names the object's generation (x-goog-generation),
and a conditional read answers as GCS does (ifGenerationNotMatch of the current
generation: 304 Not Modified; ifGenerationMatch of another: 412). Without them
tensorstore's OCDBT store fails with "Malformed StorageGeneration"."""

from http import HTTPStatus
import sys

from gcp_storage_emulator import exceptions
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  """objects.download, with the object's generation and GCS's conditional reads."""
  try:
    generation = str(storage.get_file_obj(request.params["bucket_name"],
                                          request.params["object_id"])["generation"])
  except exceptions.NotFound:
    return _download(request, response, storage, *args, **kwargs)
  if request.query.get("ifGenerationNotMatch", [None])[0] == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  if request.query.get("ifGenerationMatch", [generation])[0] != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  response["x-goog-generation"] = generation
  return _download(request, response, storage, *args, **kwargs)


if __name__ == "__main__":
  objects.download = download  # before the server module builds its routes from it
  from gcp_storage_emulator import __main__ as emulator
  emulator.main(sys.argv[1:])
