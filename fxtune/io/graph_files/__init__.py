"""GraphModules as data: `fxtune.save` / `fxtune.load` (graph.json + tensors.safetensors), and pickling.

store.py (entry points), nodes.py (the graph as JSON), values.py (tagged JSON values, GraphFileError),
targets.py (the allow-list of call targets), module_tree.py + module_recipes.py (the module tree,
torch.nn layers rebuilt from constructor arguments), tensor_table.py (tied tensors stored once),
export_guards.py (torch.export's input check as a graph), pickling.py (fxtune GraphModules pickle,
copy and deepcopy their graph as data; importing it registers that for every GraphModule built).
Loading never unpickles and never runs code from the file.
"""

from . import pickling  # noqa: F401  (registers the pickling hooks on every GraphModule fxtune builds)
from .store import load, save
from .values import GraphFileError

__all__ = ["GraphFileError", "load", "save"]
