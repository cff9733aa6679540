"""Text from input made safe to print: a study file's name, a feature value or a config string may
hold terminal escape sequences (retitle, clear or rewrite the user's terminal). Every control
character but newline and tab is shown as ``\\xNN`` instead of being sent to the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.segment import Segment

_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


class SafeConsole(Console):
    """A Rich console whose printed text never carries a control character from its content; Rich's
    own styling and cursor control (spinners, progress bars) pass as they are."""

    def _render_buffer(self, buffer) -> str:
        return super()._render_buffer(
            Segment(escape_controls(text), style, control) if not control else Segment(text, style, control)
            for text, style, control in buffer)
