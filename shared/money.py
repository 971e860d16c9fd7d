"""Money is integer cents; this is the one place that turns cents into text."""


def dollars(cents: int) -> str:
    """Format cents as US dollars: 150 -> '$1.50', -75 -> '-$0.75'."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(int(cents)), 100)
    return f"{sign}${whole:,}.{part:02d}"
