"""Errors that reach the user as one clear line (no traceback) and a non-zero exit."""


class GmpipeError(Exception):
    """A problem the user can fix: bad input, a missing upstream artifact, an unusable file."""

    exit_code = 1


class ParamsError(GmpipeError):
    """An unusable params file or mapping: one ``dotted.key: rule (got value)`` line per problem.

    ``problems`` (and the message, each line prefixed with ``source``) holds at most ``MAX_LINES`` of them, each at
    most ``MAX_WIDTH`` characters, then a count of the rest, so a hostile file can never make the message itself
    large; ``all_problems`` keeps every one."""

    exit_code = 2
    MAX_LINES = 50
    MAX_WIDTH = 400

    def __init__(self, source: str, problems: list[str]):
        self.source = shorten(str(source), 200)
        self.all_problems = list(problems)
        self.problems = [shorten(problem, self.MAX_WIDTH) for problem in problems[: self.MAX_LINES]]
        if len(problems) > self.MAX_LINES:
            self.problems.append(f"... and {len(problems) - self.MAX_LINES} more problems")
        super().__init__("\n".join(f"{self.source}: {problem}" for problem in self.problems))


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with a note of how long it was."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text):,} characters)"
