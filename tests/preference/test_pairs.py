"""The pairs format is TRL's conversational preference format, readable by datasets.load_dataset("json")."""

import pytest

from workbench.errors import InputError
from workbench.preference.pairs import pair, read_pairs, write_pairs


def test_written_pairs_load_with_datasets_as_trl_conversational_preference_data(tmp_path):
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    rows = [pair("Hi <b>there</b>", "Hello!", "Go away.", chosen_score=0.6, rejected_score=0.4),
            pair([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Help?"}], "Sure.", "No.")]
    path = write_pairs(rows, tmp_path / "data")
    ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 2 and {"prompt", "chosen", "rejected", "chosen_score"} <= set(ds.column_names)
    assert is_conversational(ds[0])
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert ds[1]["prompt"][0] == {"role": "system", "content": "Be kind."}
    assert read_pairs(tmp_path / "data") == [dict(r) for r in rows]


@pytest.mark.parametrize(("row", "field"), [
    ('{"prompt": [], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}', "prompt"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}', "chosen.0.role"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]}', "rejected"),
])
def test_a_bad_row_names_its_line_and_field(tmp_path, row, field):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n" + row + "\n")
    with pytest.raises(InputError, match=rf"line 2, field {field}\b"):
        read_pairs(path)
    path.write_text("{not json\n")
    with pytest.raises(InputError, match="line 1: not JSON"):
        read_pairs(tmp_path)
