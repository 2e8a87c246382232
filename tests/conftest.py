import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project files import as modules
torch.set_num_threads(1)  # tiny models: one thread is faster, and safe when other processes share the cores
