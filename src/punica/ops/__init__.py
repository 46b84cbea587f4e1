"""GPU kernels (Triton) beside their pure-torch references (`*_ref.py`)."""
