"""Benchmarks of the papers, scored as their official tools score them.

- `evaluate(answerer, task, data, output)`: run a model on a benchmark in its official release layout.
- `score(task, data, answers)`: score an existing LLaVA answer file (`question_id`, `text`), no model.
- `write_summary(results, dir)` / `run_summary(...)`: several tasks and models in one paper-style table.
Tasks live one per module in `llava_gm.eval.tasks`; `TASKS` lists them by name.
"""

from .base import Problems, Question, Task
from .runner import evaluate, run_summary, score, summary_markdown, summary_table, write_summary
from .tasks import TASKS, get_task

__all__ = ["evaluate", "score", "run_summary", "write_summary", "summary_table", "summary_markdown",
           "TASKS", "get_task", "Task", "Question", "Problems"]
