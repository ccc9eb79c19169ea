"""data/prepare/parsing.py: the label-list format, errors naming file and line."""

import pytest

from medbench_jax.data.prepare import cxr_lists
from medbench_jax.data.prepare import parsing
from medbench_jax.data.prepare.errors import DataFormatError


def test_reference_split_list_format_parses(tmp_path):
  # The NIH list format: name then 14 space-separated 0/1 labels.
  path = tmp_path / "Xray14_val_official.txt"
  path.write_text("00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n"
                  "00000002_000.png 1 0 0 0 0 0 0 0 0 0 0 0 0 1\n")
  entries = parsing.read_label_list(path, len(cxr_lists.Chestxray14.LABELS))
  assert [e.name for e in entries] == ["00000001_000.png", "00000002_000.png"]
  assert entries[0].labels[1] == 1 and entries[1].labels[13] == 1


@pytest.mark.parametrize("line,message", [
    ("a.png 0 1 0", r"list.txt:2: expected an image name and 4 labels, got 4 fields"),
    ("a.png 0 1 x 0", r"list.txt:2: labels must be numbers"),
])
def test_bad_list_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "list.txt"
  path.write_text(f"ok.png 0 0 0 0\n{line}\n")
  with pytest.raises(DataFormatError, match=message):
    parsing.read_label_list(path, 4)
