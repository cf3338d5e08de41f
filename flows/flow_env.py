"""What every flow file sets up before it imports Metaflow (``import flow_env`` at its top).

- ``steps`` is importable when the project is not pip-installed, and on remote compute, where the
  code package puts ``steps/`` next to the flow file.
- Metaflow refuses to run without a user name other than "root", and containers and CI often run
  as root or set no ``$USER`` at all: fall back to ``"<account>-local"`` so ``run`` just works (set
  ``METAFLOW_USER`` to choose the name recorded in the run's metadata).
- A local ``@parallel`` step starts its other nodes with the ``python`` found on ``$PATH``, not
  with the interpreter running the flow: ``.venv/bin/python flows/sft_flow.py run`` without an
  activated venv would start node 1 without Metaflow or torch (it dies at import, and node 0 waits
  for it at the rendezvous). This interpreter's folder goes first on ``$PATH``.
"""

import getpass
import os
import sys
from pathlib import Path

for _root in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if (_root / "steps" / "__init__.py").exists() and str(_root) not in sys.path:
        sys.path.insert(0, str(_root))
        break

if not any(os.environ.get(v) not in (None, "", "root") for v in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
    os.environ["METAFLOW_USER"] = f"{getpass.getuser()}-local"

_bin = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = os.pathsep.join(filter(None, [_bin, os.environ.get("PATH")]))
