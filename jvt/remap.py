"""`python -m jvt.remap`: the weight-remapping command (implemented in
`jvt.methods.distill.remap`, whose public names are re-exported here)."""
from jvt.methods.distill.remap import (evenly_spaced_blocks, main, narrow, plain_params, remap,
                                       remap_teacher, select_blocks, student_fields)

if __name__ == "__main__":
  main()
