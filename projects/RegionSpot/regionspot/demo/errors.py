"""The demos' error for what a user gave."""


class DemoError(ValueError):
    """A problem with what the user gave (image, prompts, vocabulary, model): shown to the user as
    it is (in the web demo, as a message in the page)."""
