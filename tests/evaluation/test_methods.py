import contextlib

import pytest

from workbench.errors import InputError
from workbench.evaluation.methods import (
    ControlLeakError,
    Decoding,
    Method,
    MethodResponse,
    NoControl,
    PrefixMethod,
    PromptInstruction,
    RepeAddition,
    SelfControlMethod,
    build_methods,
    choose_coefficient,
    hook_state,
    run_isolated,
)
from workbench.prefix.controller import PrefixController
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.search import self_control
from workbench.selfcontrol.suffix import score_responses
from workbench.selfcontrol.tasks import get_task

DEC = Decoding(max_new_tokens=6, seed=0)
TASK = get_task("angry2peaceful")
PROMPT = TASK.split("test")[0]
SC = {"iterations": 1, "n_steps": 2, "initial_step": -0.05}


@pytest.fixture(scope="module")
def repe(tiny):
    method = RepeAddition(coefficients=(0.0, 0.1, 1.0), n_select=4, n_pairs=4)
    state = method.prepare(tiny, TASK, DEC, held_out=TASK.split("test"))
    return method, state


def test_build_methods_by_name_and_bad_input(tmp_path):
    methods = build_methods("none,prompt,repe,selfcontrol")
    assert [m.name for m in methods] == ["none", "prompt", "repe", "selfcontrol"]
    assert build_methods(["prefix"], prefix=tmp_path)[0].name == "prefix"
    with pytest.raises(InputError, match="unknown method"):
        build_methods("none,steer")
    with pytest.raises(InputError, match="prefix"):
        build_methods("prefix")
    with pytest.raises(InputError, match="distinct"):
        build_methods("none,none")
    with pytest.raises(InputError, match="max_new_tokens"):
        Decoding(max_new_tokens=0)
    with pytest.raises(InputError, match=r"selfcontrol: unknown settings \['iteratons'\]"):
        SelfControlMethod({"iteratons": 2})
    with pytest.raises(InputError, match="selfcontrol: unknown settings"):
        build_methods("selfcontrol", selfcontrol={"iteratons": 2})


def test_prompt_method_adds_the_instruction_only(tiny):
    method = PromptInstruction("user")
    ids = method.prompt_ids(tiny, TASK, PROMPT)
    text = tiny.decode(ids, skip_special_tokens=False)
    assert f"{TASK.instruction}\n\n{PROMPT}" in text
    # the default system message is kept: the only difference from `none` is the instruction
    plain = tiny.decode(tiny.chat_ids(PROMPT), skip_special_tokens=False)
    assert text.replace(f"{TASK.instruction}\n\n", "") == plain
    system = tiny.decode(PromptInstruction("system").prompt_ids(tiny, TASK, PROMPT), skip_special_tokens=False)
    assert system.index(TASK.instruction) < system.index(PROMPT)
    assert f"{TASK.instruction}\n\n{PROMPT}" not in system
    out = method.respond(tiny, TASK, PROMPT, DEC)
    assert out.prompt_ids == ids and 0 < len(out.response_ids) <= DEC.max_new_tokens
    with pytest.raises(InputError, match="instruction"):
        method.prompt_ids(tiny, TASK.__class__(question="Is it ok?", id="x"), PROMPT)


def test_repe_coefficient_is_chosen_on_train_prompts_outside_the_evaluated_ones(tiny, repe):
    method, state = repe
    assert state["selection_prompts"] == TASK.split("train")[:4]
    assert not set(state["selection_prompts"]) & set(TASK.split("test"))
    assert [row["coefficient"] for row in state["grid"]] == [0.0, 0.1, 1.0]
    assert state["layers"] == method.window(tiny) == [1, 2]
    # evaluating on train prompts: the selection moves past them
    other = RepeAddition(coefficients=(0.0,), n_select=1, n_pairs=4)
    assert other.prepare(tiny, TASK, DEC, held_out=TASK.split("train")[:3])["selection_prompts"] == [TASK.split("train")[3]]


def test_repe_selection_batch_gives_each_row_what_it_gives_alone(tiny, repe):
    """prepare generates every (prompt, coefficient) row in one left-padded batch under per-row controls, each on
    its own prompt; if that shifted the vector or the padding leaked, the coefficient would be chosen on other text."""
    method, state = repe
    vector, layers = method._vectors[TASK.id], state["layers"]
    prompt_ids = [tiny.chat_ids(p) for p in state["selection_prompts"]]
    assert len({len(ids) for ids in prompt_ids}) > 1  # lengths differ: the batch is left-padded
    width = max(len(ids) for ids in prompt_ids)
    rows = [(ids, c) for ids in prompt_ids for c in method.coefficients]
    with Control.stack([vector.as_control(tiny, width, c, layers) for _, c in rows]).applied(tiny):
        with pytest.raises(InputError, match="belongs to"):  # one width for all rows no longer lands anywhere
            tiny.generate([ids for ids, _ in rows], **DEC.kwargs())
    with Control.stack([vector.as_control(tiny, len(ids), c, layers).bind(ids) for ids, c in rows]).applied(tiny):
        batched = [list(t) for t in tiny.generate([ids for ids, _ in rows], **DEC.kwargs()).tokens]
    alone = []
    for ids, c in rows:
        with vector.as_control(tiny, len(ids), c, layers).applied(tiny):
            alone.append(list(tiny.generate([ids], **DEC.kwargs()).tokens[0]))
    assert batched == alone
    assert len({tuple(t) for t in alone[: len(method.coefficients)]}) > 1  # the coefficients do steer
    # the grid prepare recorded is the mean over these responses, scored one row at a time
    scores = [float(score_responses(tiny, [ids], [t], TASK).scores[0]) for (ids, _), t in zip(rows, alone, strict=True)]
    for i, row in enumerate(state["grid"]):
        per_prompt = scores[i :: len(method.coefficients)]
        assert row["score"] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-5)


def test_choose_coefficient_guard_is_relative_to_no_steering():
    def grid(*rows):
        return [{"coefficient": c, "score": s, "nll": n, "degenerate": d} for c, s, n, d in rows]

    # the best score loops more than the plain model, the next is too disfluent: the third wins
    table = grid((0.0, 0.45, 0.8, 0), (0.1, 0.47, 1.0, 0), (0.2, 0.50, 1.0, 1), (0.05, 0.46, 1.4, 0))
    assert choose_coefficient(table)["coefficient"] == 0.1
    assert [r["admissible"] for r in table] == [True, True, False, False]
    # the plain model itself loops once: steering that loops once is allowed, and no steering can still win
    table = grid((0.0, 0.44, 0.8, 1), (0.025, 0.43, 1.1, 1), (0.1, 0.46, 1.2, 2))
    assert choose_coefficient(table)["coefficient"] == 0.0
    assert choose_coefficient(grid((0.0, 0.4, 1.0, 0), (0.1, 0.4, 1.0, 0)))["coefficient"] == 0.0  # tie: smaller


def test_repe_reuses_saved_state_and_zero_coefficient_is_no_control(tiny):
    method = RepeAddition(coefficients=(0.0, 1.0), n_pairs=4)
    assert method.prepare(tiny, TASK, DEC, state={"coefficient": 0.0}) == {"coefficient": 0.0}
    out = method.respond(tiny, TASK, PROMPT, DEC)
    assert out.info == {"coefficient": 0.0}
    assert out.response_ids == NoControl().respond(tiny, TASK, PROMPT, DEC).response_ids
    method.prepare(tiny, TASK, DEC, state={"coefficient": 5.0})
    assert method.respond(tiny, TASK, PROMPT, DEC).response_ids != out.response_ids


def test_selfcontrol_method_matches_the_search_and_uses_shared_decoding(tiny):
    out = SelfControlMethod(SC).respond(tiny, TASK, PROMPT, DEC)
    direct = self_control(tiny, PROMPT, TASK, max_new_tokens=DEC.max_new_tokens, seed=DEC.seed, progress=False, **SC)
    assert out.response_ids == direct.response_ids
    assert out.info["search_score"] == pytest.approx(direct.score)
    assert set(out.info) >= {"initial_score", "gain", "iterations_accepted", "iterations_run"}
    assert "max_new_tokens" not in SelfControlMethod(SC).settings()


def test_selfcontrol_method_searches_its_prompts_together_with_the_same_answers(tiny):
    prompts = TASK.split("test")[:3]
    method = SelfControlMethod(SC, batch_prompts=3)
    assert method.prompts_per_call == 3 and SelfControlMethod(SC).prompts_per_call is None
    together = method.respond_many(tiny, TASK, prompts, DEC)
    alone = [SelfControlMethod(SC, batch_prompts=1).respond(tiny, TASK, p, DEC) for p in prompts]
    assert [r.response_ids for r in together] == [r.response_ids for r in alone]
    assert [r.info["search_score"] for r in together] == pytest.approx([r.info["search_score"] for r in alone], abs=1e-4)
    with pytest.raises(InputError, match="batch_prompts"):
        SelfControlMethod(SC, batch_prompts=0)


def _controller(tiny, folder, task_id=None):
    c = PrefixController.init(tiny, n_tokens=2)
    c.embeddings = c.embeddings + 0.5
    if task_id:
        c.meta["training"] = {"task": task_id}
    c.save(folder)
    return c


def test_prefix_method_loads_per_task_folders_and_refuses_another_task(tiny, tmp_path):
    _controller(tiny, tmp_path / "angry2peaceful", "angry2peaceful")
    method = PrefixMethod(tmp_path)
    state = method.prepare(tiny, TASK, DEC)
    assert state["folder"] == str(tmp_path / "angry2peaceful") and state["n_tokens"] == 2
    out = method.respond(tiny, TASK, PROMPT, DEC)
    assert 0 < len(out.response_ids) <= DEC.max_new_tokens and tiny.prefix_ids == []
    with pytest.raises(InputError, match="no prefix controller"):
        method.prepare(tiny, get_task("happy2sad"), DEC)
    _controller(tiny, tmp_path / "single", "angry2peaceful")
    with pytest.raises(InputError, match="trained for task"):
        PrefixMethod(tmp_path / "single").prepare(tiny, get_task("happy2sad"), DEC)


def test_no_control_leaks_from_one_method_into_the_next(tiny, repe, tmp_path):
    none = NoControl()
    alone = run_isolated(tiny, none, TASK, PROMPT, DEC).response_ids
    before = hook_state(tiny)
    controller = _controller(tiny, tmp_path / "angry2peaceful")
    prefix = PrefixMethod(tmp_path)
    prefix.prepare(tiny, TASK, DEC)
    method, state = repe
    method.prepare(tiny, TASK, DEC, state={"coefficient": 1.0})
    ids = tiny.chat_ids(PROMPT)

    def generate(prompt_ids, control=None):
        with control.applied(tiny) if control is not None else contextlib.nullcontext():
            return list(tiny.generate([prompt_ids], **DEC.kwargs()).tokens[0])

    # what each method's control produces when applied by hand: the isolated run must give exactly that
    expected = {
        "selfcontrol": list(self_control(tiny, PROMPT, TASK, max_new_tokens=DEC.max_new_tokens, seed=DEC.seed,
                                         progress=False, **SC).response_ids),
        "repe": generate(ids, method._vectors[TASK.id].as_control(tiny, len(ids), 1.0, state["layers"])),
        "prefix": generate(ids, controller),
        "prompt": generate(PromptInstruction().prompt_ids(tiny, TASK, PROMPT)),
    }
    for m in (SelfControlMethod(SC), method, prefix, PromptInstruction()):
        out = run_isolated(tiny, m, TASK, PROMPT, DEC)
        assert out.response_ids == expected[m.name], m.name
        assert hook_state(tiny) == before
        assert run_isolated(tiny, none, TASK, PROMPT, DEC).response_ids == alone
    # the controls did act while they were applied (a reading vector at 1x the residual norm, an instruction)
    assert expected["repe"] != alone and expected["prompt"] != alone


class _Leaky(Method):
    name = "leaky"

    def respond(self, model, task, prompt, decoding):
        model.prefix = PrefixController.init(model, 1)  # the applied-prefix state, never cleared
        return MethodResponse([], [], 0.0)


def test_run_isolated_catches_a_method_that_leaves_control_behind(tiny):
    try:
        with pytest.raises(ControlLeakError, match="leaky"):
            run_isolated(tiny, _Leaky(), TASK, PROMPT, DEC)
    finally:
        tiny.prefix = None


@pytest.mark.embedded
def test_embedded_methods_change_the_answer_and_leave_the_model_clean(embedded):
    """On SmolLM2: the instruction and a reading vector (10% of the residual norm, middle layers) both change
    the greedy answer, and `none` afterwards is bit-identical to `none` before."""
    dec = Decoding(max_new_tokens=16)
    none = run_isolated(embedded, NoControl(), TASK, PROMPT, dec).response_ids
    method = RepeAddition(n_pairs=6)
    method.prepare(embedded, TASK, dec, state={"coefficient": 0.1})
    assert run_isolated(embedded, method, TASK, PROMPT, dec).response_ids != none
    assert run_isolated(embedded, PromptInstruction(), TASK, PROMPT, dec).response_ids != none
    assert run_isolated(embedded, NoControl(), TASK, PROMPT, dec).response_ids == none
