"""Board descriptions: one TOML file per board, read into ``trilut.config.BoardConfig``."""

from importlib import resources

__all__ = ["board_names", "board_text"]


def board_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".toml"))


def board_text(name: str) -> str:
    path = resources.files(__name__) / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown board {name!r}; known boards: {', '.join(board_names())}")
    return path.read_text()
