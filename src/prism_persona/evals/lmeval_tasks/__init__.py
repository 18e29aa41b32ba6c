"""lm-eval task YAMLs shipped with prism (``--include_path`` this folder).

``python -m prism_persona.evals.lmeval_tasks`` prints the folder's path.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
