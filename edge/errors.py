"""The one exception type the user sees: a one-line, actionable message."""


class ClaraError(Exception):
    """An error caused by input or environment, reported as one line with a non-zero exit."""


def cause_line(error: BaseException, limit: int = 240) -> str:
    """`Type: message` of a library's exception in one line: its summary line where the text has one (torch.onnx
    puts the cause under '## Exception summary' and ends with a pointer to a stack trace), else its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    summary = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("## Exception summary")), None)
    told = [line for line in lines if not line.startswith("(Refer to")]
    return f"{type(error).__name__}: {(summary or (told[-1] if told else ''))[:limit]}"
