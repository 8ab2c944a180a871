"""The one error the planner raises for input it cannot plan, so the command line can print it and exit 2.

Every message names the field (``models[3] (llama-70b).weights_gib``) and says how to fix it: the person
reading it has a YAML file open and should not need a traceback to find the line to change.
"""

from __future__ import annotations


class PlanInputError(ValueError):
    """Input the planner cannot use: a bad file, a field out of range, a model that fits no GPU."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}" if field else problem
        super().__init__(f"{message}; {fix}" if fix else message)
