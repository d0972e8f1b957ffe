import os

# torch's OpenMP threads spin while waiting; on a loaded 2-core machine that makes small SVDs
# hundreds of times slower. Passive waiting costs nothing when the machine is quiet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
