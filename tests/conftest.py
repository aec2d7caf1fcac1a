import os

# Triton kernels run on the CPU through its interpreter; it must be chosen
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
