"""tools/decoder_benchmark.py: both ways timed on the same prompts, and their tokens compared."""
from conftest import load_tool

decoder_benchmark = load_tool("decoder_benchmark")


def test_rows_for_each_family_and_box_count_with_identical_tokens(capsys):
    assert decoder_benchmark.main(["--sam", "tiny", "sam2_tiny", "--boxes", "5", "13", "--slice", "4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny") or
            line.startswith("| sam2_tiny")]
    assert [r.split("|")[1:3] for r in rows] == [[" tiny ", " 5 "], [" tiny ", " 13 "], [" sam2_tiny ", " 5 "],
                                                 [" sam2_tiny ", " 13 "]]
    assert not any("DIFFER" in r for r in rows)
    for r in rows:  # two times (printed to 10 ms, so a fast machine may print 0.00) and the saving
        with_masks, tokens_only = (float(c.strip()) for c in r.split("|")[3:5])
        assert with_masks >= 0 and tokens_only >= 0 and r.split("|")[5].strip().endswith("%")
