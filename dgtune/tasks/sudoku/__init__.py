"""Sudoku (4x4 and 9x9): the puzzle engine (`engine`: solver, unique-puzzle generator, grading, CSV I/O) and the
dgtune task built on it (`task`: splits, difficulty buckets, canvas layouts and templates, rule guide), registered
as `task.name: sudoku` (`configs/task/sudoku4.yaml`, `sudoku9.yaml`)."""

from dgtune.tasks.sudoku import engine
from dgtune.tasks.sudoku.task import SudokuTask, build_sudoku

__all__ = ["SudokuTask", "build_sudoku", "engine"]
