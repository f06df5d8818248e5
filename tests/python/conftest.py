import os
import sys

# The reference lives in tools/lm2ref; make it importable however pytest is started.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
