"""What the demos share, as library code: the prompt-line grammar (`prompt_lines`), vocabulary
text (`vocabulary_text`), result tables, records and instances (`results`) and example images
(`examples`). `tools/demo.py` and `tools/web_demo.py` only parse arguments, loop and draw the page."""
