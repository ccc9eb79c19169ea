# TEMPORARY SHIM (not to be committed)
import jax
from medbench_jax.data import builders, phantom, sources
def prepare_dataset(d, workers=None):
  import ml_collections
  c = ml_collections.ConfigDict({'dataset': d})
  manual_dir = sources.manual_dir_for(c); data_dir = sources.data_dir_for(c)
  if d.name == "phantom_cxr":
    p = d.phantom
    phantom.generate(manual_dir, seed=p.seed, num_train=p.num_train, num_val=p.num_val,
                     num_test=p.num_test, image_size=p.image_size, workers=builders.default_workers())
  options = d.csv.to_dict() if builders.takes_options(d.name) else None
  return builders.prepare(d.name, manual_dir, data_dir, d.image_size, skip_bad=d.skip_bad, options=options)
