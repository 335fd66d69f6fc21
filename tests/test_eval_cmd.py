"""`relay eval` on tiny models with real Ray actors and a vLLM generator; its figures checked against the same
quantities computed directly with transformers (reward-model ranking, DPO implicit rewards)."""
from __future__ import annotations

import json

import pytest
import torch

BETA = 0.1
PAIRS = 16


def _perturbed_copy(src, dst):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _summed_label_logps(model_dir, ids, labels):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq, lab in zip(ids, labels):
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), -1)
            target = torch.tensor(lab[1:])
            keep = target != -100
            out.append(float(logp[keep].gather(-1, target[keep, None]).sum()))
    return torch.tensor(out)


@pytest.mark.slow
def test_relay_eval_side_by_side(ray_session, tiny_llama_dir, tiny_demo_data, tmp_path):
    from relay.launch.eval_cmd import main
    from relay.launch.train_data import load_samples
    from relay.models.heads import CriticModel

    policy = _perturbed_copy(tiny_llama_dir, tmp_path / "policy")
    rm = tmp_path / "rm"
    CriticModel.from_pretrained(str(tiny_llama_dir), seed=3).save_pretrained(rm)
    out = tmp_path / "eval"
    code = main(["--model", f"ref={tiny_llama_dir}", "--model", f"policy={policy}", "--model", f"rm={rm}",
                 "--reference", str(tiny_llama_dir), "--prompts", str(tiny_demo_data / "prompt_heldout"),
                 "--preferences", str(tiny_demo_data / "preference_heldout"),
                 "--reward-rule", "relay.actors.scorers:low_token_share", "--pass-threshold", "0.5",
                 "--num-prompts", "8", "--num-pairs", str(PAIRS), "--samples", "2", "--max-new-tokens", "8",
                 "--beta", str(BETA), "--out", str(out)])
    assert code == 0
    res = json.loads((out / "eval.json").read_text())["models"]
    assert (out / "eval.png").stat().st_size > 0

    pairs = load_samples([str(tiny_demo_data / "preference_heldout")], "preference", 256)
    c = {k: v[:PAIRS] for k, v in pairs.columns.items()}
    # reward model: score at the last token of each whole sequence, ties count half
    model = CriticModel.from_pretrained(str(rm)).eval()
    with torch.no_grad():
        rc = torch.tensor([float(model(torch.tensor([s]))[0, -1]) for s in c["chosen_input_ids"]])
        rr = torch.tensor([float(model(torch.tensor([s]))[0, -1]) for s in c["rejected_input_ids"]])
    expected = float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean())
    assert res["rm"]["rm_accuracy"] == pytest.approx(expected)
    # policy against the reference: beta * (log pi - log ref) of chosen above that of rejected
    pc = _summed_label_logps(policy, c["chosen_input_ids"], c["chosen_labels"])
    pr = _summed_label_logps(policy, c["rejected_input_ids"], c["rejected_labels"])
    qc = _summed_label_logps(tiny_llama_dir, c["chosen_input_ids"], c["chosen_labels"])
    qr = _summed_label_logps(tiny_llama_dir, c["rejected_input_ids"], c["rejected_labels"])
    margin = BETA * ((pc - qc) - (pr - qr))
    assert res["policy"]["pref_accuracy"] == pytest.approx(float((margin > 0).float().mean()))
    assert res["policy"]["pref_margin"] == pytest.approx(float(margin.mean()), abs=1e-4)
    assert res["ref"]["pref_accuracy"] == 0.5
    # answers: the reference against itself has no KL; the perturbed policy has some; the baseline comparison
    assert abs(res["ref"]["kl"]) < 1e-3 and res["policy"]["kl_k3"] > 1e-3
    assert 0.0 <= res["policy"]["reward_mean"] <= 1.0 and res["policy"]["prompts"] == 8.0
    assert "effect_sd" in res["policy"] and res["policy"]["baseline"] == "ref"
    assert res["policy"]["samples"] and "answer" in res["policy"]["samples"][0]
