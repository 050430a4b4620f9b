"""pretrain/finetune: data, schedule, checkpoints, resume, and a 2-process Accelerate run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import accelerate_launch_on_cpu, write_images_dataset

from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.parquet import CURATED_SCHEMA, rows_to_table
from capfilt.training.loop import TrainConfig, itc_alpha, learning_rate, train
from capfilt.training.pairs import DecodeBatch
from capfilt.training.runs import (
    latest_checkpoint,
    load_run,
    read_log,
    read_metadata,
    save_checkpoint,
)
from capfilt.training.stream import DatasetSource, Picking, build_plan

# A toy pretraining run: 20 usable pairs, batches of 4 → 5 batches per epoch, so the
# checkpoint at step 3 is in the middle of epoch 0 and the one at step 6 in epoch 1.
TOY = dict(
    preset="tiny",
    vocab_size=200,
    batch_size=4,
    max_steps=8,
    save_every=3,
    keep_last=3,
    queue_size=16,
    lr=1e-3,
    warmup_steps=2,
    num_workers=0,
    progress=False,
    seed=7,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "ds"
    write_images_dataset(root, n_shards=2, per_shard=12)
    return root


@pytest.fixture(scope="module")
def straight_run(toy_dataset, tmp_path_factory):
    """8 uninterrupted steps, checkpoints at 3, 6 and 8."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    result = train(TrainConfig(datasets=(str(toy_dataset),), out=str(out), **TOY))
    return out, result


# --- schedule ----------------------------------------------------------------------------
def test_learning_rate_warms_up_then_decays_to_the_minimum():
    lr = [
        learning_rate(
            s, base_lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, total_steps=110
        )
        for s in range(111)
    ]
    assert lr[0] == pytest.approx(1e-6)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11], strict=False))  # warm-up rises
    assert lr[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))  # cosine falls
    assert lr[60] == pytest.approx((1e-3 + 1e-5) / 2)  # half way down at half the decay
    assert lr[110] == pytest.approx(1e-5)


def test_blip_schedule_warms_up_in_epoch_0_then_decays_by_0_9_per_epoch():
    """pretrain.py of salesforce/BLIP: warmup_lr_schedule in epoch 0, step_lr_schedule after."""
    from capfilt.training.loop import blip_learning_rate

    def lr(step, epoch):
        return blip_learning_rate(
            step,
            epoch,
            base_lr=3e-4,
            min_lr=1e-6,
            warmup_lr=1e-6,
            warmup_steps=3000,
            decay_rate=0.9,
        )

    assert lr(0, 0) == pytest.approx(1e-6)
    assert lr(1500, 0) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert lr(3000, 0) == lr(5000, 0) == pytest.approx(3e-4)
    assert lr(9000, 1) == pytest.approx(3e-4 * 0.9)
    assert lr(20000, 5) == pytest.approx(1.77147e-4)  # the 1.77e-4 at epoch 5
    assert lr(10**6, 80) == pytest.approx(1e-6)  # never below min_lr
    assert TrainConfig(datasets=("d",), out="o").lr_schedule == "blip"
    assert TrainConfig(datasets=("d",), out="o", preset="tiny").lr_schedule == "cosine"
    assert TrainConfig(datasets=("d",), out="o", task="caption").lr_schedule == "cosine"
    assert TrainConfig(datasets=("d",), out="o", schedule="cosine").lr_schedule == "cosine"


def test_pretraining_ramps_alpha_over_two_epochs_finetuning_over_one():
    pretrain = TrainConfig(datasets=("d",), out="o")
    assert pretrain.alpha_ramp_epochs == 2
    assert itc_alpha(0.4, 0, 100, 100, pretrain.alpha_ramp_epochs) == pytest.approx(0.2)
    assert itc_alpha(0.4, 1, 100, 100, pretrain.alpha_ramp_epochs) == pytest.approx(0.4)
    assert TrainConfig(datasets=("d",), out="o", task="itm").alpha_ramp_epochs == 1


def test_the_released_presets_train_with_blips_dropout_eps_and_stochastic_depth(tiny_tokenizer):
    from capfilt.models.med import med_config

    base, large = med_config("base", tiny_tokenizer), med_config("large", tiny_tokenizer)
    for config in (base, large):
        assert config.text["hidden_dropout_prob"] == config.text["attention_probs_dropout_prob"]
        assert config.text["hidden_dropout_prob"] == 0.1
        assert config.vision["layer_norm_eps"] == 1e-6
    assert (base.drop_path_rate, large.drop_path_rate) == (0.0, 0.1)


def test_stochastic_depth_drops_branches_in_training_only(tiny_tokenizer):
    from capfilt.models.med import MED, med_config

    torch.manual_seed(0)
    plain = MED(med_config("tiny", tiny_tokenizer, queue_size=8))
    torch.manual_seed(0)
    dropping = MED(med_config("tiny", tiny_tokenizer, queue_size=8, drop_path_rate=0.5))
    layers = dropping.vision_model.encoder.layers
    assert [layer.drop_path for layer in layers] == [0.0, 0.5]  # rising to the rate
    assert not hasattr(plain.vision_model.encoder.layers[1], "drop_path")
    assert plain.state_dict().keys() == dropping.state_dict().keys()
    pixels = torch.randn(4, 3, 64, 64)
    dropping.eval(), plain.eval()
    same = dropping.vision_model(pixels).last_hidden_state
    torch.testing.assert_close(same, plain.vision_model(pixels).last_hidden_state)
    dropping.train()
    outs = [dropping.vision_model(pixels).last_hidden_state for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_the_same_texts_give_the_same_vocabulary_in_every_process(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, json; from capfilt.models.tokenizers import train_tokenizer\n"
        "texts = [f'a {c} {s} on a {b} background' for c in ('red','blue','green','pink') "
        "for s in ('circle','square','star') for b in ('white','black')] * 3\n"
        "tok = train_tokenizer(texts, 60)\n"
        "print(json.dumps(sorted(tok.get_vocab().items())))\n"
    )
    vocabularies = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(vocabularies) == 1


def test_itc_alpha_ramps_in_over_the_first_epoch():
    assert itc_alpha(0.4, 0, 0, 100) == 0.0
    assert itc_alpha(0.4, 0, 50, 100) == pytest.approx(0.2)
    assert itc_alpha(0.4, 0, 100, 100) == pytest.approx(0.4)
    assert itc_alpha(0.4, 1, 0, 100) == pytest.approx(0.4)


# --- data --------------------------------------------------------------------------------
def test_curated_pairs_join_their_images_and_skips_are_counted(tmp_path):
    root = tmp_path / "ds"
    truths = write_images_dataset(root, n_shards=1, per_shard=6)
    (k0, c0), (k1, _) = truths[0], truths[1]
    failed_key = "000000004"  # every 5th row is a failed download
    rows = [
        dict(key=k0, text_id=0, source="web", text=c0, itm_score=0.9),
        dict(key=k0, text_id=1, source="synthetic", text="A RED thing!", itm_score=0.8),
        dict(key=k1, text_id=1, source="synthetic", text="another", itm_score=0.7),
        dict(key=failed_key, text_id=0, source="web", text="lost", itm_score=0.9),
        dict(key="nope", text_id=0, source="web", text="orphan", itm_score=0.9),
    ]
    Dataset(str(root)).write_shard("curated", 0, rows_to_table(rows, CURATED_SCHEMA))

    skipped: dict = {}
    found = DatasetSource(str(root), Picking("all", 30)).candidates(0, skipped)
    assert [c.key for c in found] == [k0, k0, k1]
    assert found[1].text == "a red thing"  # BLIP's pre_caption: lower case, no punctuation
    # Both texts of k0 point at the same image, the one stored for k0.
    assert found[0].ref == found[1].ref
    again, image = DatasetSource(str(root), Picking("all", 30)).read_unit(0)
    assert again == found
    jpg = {r["key"]: r["jpg"] for r in Dataset(str(root)).read_stage("images").to_pylist()}
    assert image(found[2].ref) == jpg[k1]
    assert skipped == {"image not downloaded": 1, "no image with this key": 1}

    plan, _ = build_plan((str(root),), (1.0,), Picking("synthetic", 30))
    assert plan.pairs == 2 and plan.skipped == {}  # the web rows are not looked at


def test_unfiltered_datasets_train_on_web_captions(tmp_path):
    root = tmp_path / "ds"
    truths = write_images_dataset(root, n_shards=2, per_shard=5, bad_keys=("000010001",))
    plan, sources = build_plan((str(root), str(root)), (1.0, 1.0), Picking("all", 30))
    assert plan.pairs == 2 * len(truths)  # the same dataset twice: twice the pairs
    assert plan.skipped == {"image not downloaded": 4}
    texts = [c.text for u in plan.units for c in sources[u.source].candidates(u.shard, {})]
    assert texts == [c for _, c in truths] * 2
    with pytest.raises(CapfiltError, match="capfilt caption"):
        build_plan((str(root),), (1.0,), Picking("synthetic", 30))


def test_augmentation_is_a_function_of_the_pair_seed_and_bad_images_leave_the_batch(
    toy_dataset, tiny_tokenizer
):
    jpg = Dataset(str(toy_dataset)).read_shard("images", 0, ["jpg"]).column("jpg")[0].as_py()
    decode = DecodeBatch(tiny_tokenizer, 16, 64)
    first, _ = decode.pixels(jpg, "1/0/0/3")
    assert first.shape == (3, 64, 64)
    assert torch.equal(decode.pixels(jpg, "1/0/0/3")[0], first)
    assert not torch.equal(decode.pixels(jpg, "1/1/0/3")[0], first)
    plain = DecodeBatch(tiny_tokenizer, 16, 64, augment=False)
    assert torch.equal(plain.pixels(jpg, "a")[0], plain.pixels(jpg, "b")[0])
    batch = decode[[(jpg, "a red circle", "k0", "s0"), (b"not an image", "x", "k1", "s1")]]
    assert batch["keys"] == ["k0"] and batch["skipped"] == {"image not decodable": 1}
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 1


def test_undecodable_images_are_counted_in_the_run_and_across_a_resume(tmp_path):
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=2, per_shard=10, bad_keys=("000000001", "000010002"))
    out = tmp_path / "run"
    options = dict(TOY, max_steps=4, save_every=2)  # 16 pairs in batches of 4: 1 epoch
    result = train(TrainConfig(datasets=(str(root),), out=str(out), **options))
    assert result.examples == 16
    assert result.skipped == {"image not downloaded": 4, "image not decodable": 2}
    assert read_metadata(out / "step-4")["undecodable"] == {"image not decodable": 2}
    options["max_steps"] = 8  # one more epoch, resumed from step 4
    result = train(TrainConfig(datasets=(str(root),), out=str(out), **options))
    assert result.resumed_from == 4
    assert result.skipped == {"image not downloaded": 4, "image not decodable": 4}


# --- checkpoints -------------------------------------------------------------------------
def test_checkpoints_count_only_with_metadata_and_the_last_k_are_kept(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in range(1, 5):
        save_checkpoint(accelerator, tmp_path, step, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    (tmp_path / "step-5").mkdir()  # a save that was killed before its metadata
    (tmp_path / "step-5" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-4"
    assert read_metadata(tmp_path / "step-4") == {"step": 4}
    del model


def test_a_run_logs_every_step_and_stores_its_config(straight_run):
    out, result = straight_run
    assert result.step == result.total_steps == 8
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(set(r) >= {"loss_itc", "loss_itm", "loss_lm", "lr", "images_per_s"} for r in log)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-3", "step-6", "step-8"]
    meta = read_metadata(out / "step-3")
    assert (meta["epoch"], meta["batches_in_epoch"], meta["steps_per_epoch"]) == (0, 3, 5)
    assert meta["train_config"]["batch_size"] == 4 and meta["model_config"]["queue_size"] == 16
    stored = json.loads((out / "config.json").read_text())
    assert stored["total_steps"] == 8
    (mix,) = stored["mix"]  # the run records what it trained on
    assert mix["weight"] == 1.0 and mix["pairs"] == stored["examples"] == sum(
        mix["by_source"].values()
    )
    model, tokenizer, _ = load_run(out)
    assert int(model.queue_ptr) == (8 * 4) % 16
    assert tokenizer.convert_tokens_to_ids("[ENC]") == model.config.enc_token_id


def resume_from(straight, step: int, dataset, out, options):
    """Resume in `out` from the state a run killed after `step` leaves behind."""
    out.mkdir()
    shutil.copytree(straight / "tokenizer", out / "tokenizer")
    shutil.copytree(straight / f"step-{step}", out / f"step-{step}")
    (out / f"step-{step + 1}").mkdir()  # a checkpoint killed before its metadata is ignored
    return train(TrainConfig(datasets=(str(dataset),), out=str(out), **options))


def assert_same_trajectory(straight, resumed, first_step: int) -> None:
    want = {r["step"]: r for r in read_log(straight)}
    got = read_log(resumed)
    assert [r["step"] for r in got] == list(range(first_step, max(want) + 1))
    for record in got:
        for term in ("loss_itc", "loss_itm", "loss_lm"):
            assert record[term] == pytest.approx(want[record["step"]][term], abs=1e-5), record
    a, _, _ = load_run(straight)
    b, _, _ = load_run(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4, msg=name)


def test_resume_mid_epoch_follows_the_uninterrupted_run(straight_run, toy_dataset, tmp_path):
    straight, _ = straight_run
    result = resume_from(straight, 3, toy_dataset, tmp_path / "resumed", TOY)  # mid-epoch 0
    assert result.resumed_from == 3 and result.step == 8
    assert_same_trajectory(straight, tmp_path / "resumed", 4)

    with pytest.raises(CapfiltError, match="batch_size"):
        train(
            TrainConfig(
                datasets=(str(toy_dataset),),
                out=str(tmp_path / "resumed"),
                **dict(TOY, batch_size=2),
            )
        )


def test_resume_with_gradient_accumulation(toy_dataset, tmp_path):
    # 5 batches per epoch in steps of 2: the third step of each epoch takes its last batch only.
    options = dict(TOY, grad_accum=2, max_steps=4, save_every=2)
    straight = tmp_path / "straight"
    result = train(TrainConfig(datasets=(str(toy_dataset),), out=str(straight), **options))
    assert result.total_steps == 4
    assert read_metadata(straight / "step-2")["batches_in_epoch"] == 4
    resume_from(straight, 2, toy_dataset, tmp_path / "resumed", options)
    assert_same_trajectory(straight, tmp_path / "resumed", 3)


def test_resume_follows_the_uninterrupted_run_when_the_decoder_shares_everything(
    toy_dataset, tmp_path
):
    # `all` stores the most aliased tensors in a checkpoint: each must come back tied.
    options = dict(TOY, sharing="all", max_steps=4, save_every=2)
    straight = tmp_path / "straight"
    train(TrainConfig(datasets=(str(toy_dataset),), out=str(straight), **options))
    resume_from(straight, 2, toy_dataset, tmp_path / "resumed", options)
    assert_same_trajectory(straight, tmp_path / "resumed", 3)
    model, _, _ = load_run(tmp_path / "resumed")
    assert model.config.sharing == "all"
    layer = model.text_decoder.bert.encoder.layer[0]
    assert layer.attention is model.text_encoder.encoder.layer[0].attention


def test_a_run_keeps_its_sharing_through_resume_finetune_export_and_init(toy_dataset, tmp_path):
    from capfilt.training.export import export_run

    data = (str(toy_dataset),)
    run = tmp_path / "none"
    options = dict(TOY, max_steps=2, save_every=2)
    train(TrainConfig(datasets=data, out=str(run), sharing="none", **options))
    model, _, meta = load_run(run)
    assert meta["model_config"]["sharing"] == "none"
    assert model.text_decoder.bert.embeddings is not model.text_encoder.embeddings

    # Resuming keeps the run's sharing; another one is refused in one line.
    with pytest.raises(CapfiltError, match="with --sharing none") as refused:
        train(TrainConfig(datasets=data, out=str(run), sharing="all", **options))
    assert "\n" not in str(refused.value)
    result = train(TrainConfig(datasets=data, out=str(run), **dict(options, max_steps=3)))
    assert result.resumed_from == 2 and load_run(run)[0].config.sharing == "none"

    # Runs started from it inherit it; --init RUN with another is refused.
    options = dict(TOY, max_steps=1, save_every=1, lr=0.0, min_lr=0.0, warmup_steps=0)
    del options["preset"]
    with pytest.raises(CapfiltError, match="re-tie"):
        train(
            TrainConfig(
                datasets=data, out=str(tmp_path / "x"), init=(str(run),), sharing="all", **options
            )
        )
    train(
        TrainConfig(
            datasets=data, out=str(tmp_path / "cap"), task="caption", init=(str(run),), **options
        )
    )
    assert load_run(tmp_path / "cap")[0].config.sharing == "none"

    # An export records it, and a run started from the export rebuilds the same MED with the
    # same weights (learning rate 0).
    export_run(run, tmp_path / "export")
    train(
        TrainConfig(
            datasets=data,
            out=str(tmp_path / "from-export"),
            init=(str(tmp_path / "export"),),
            **options,
        )
    )
    want, _, _ = load_run(run)
    got, _, _ = load_run(tmp_path / "from-export")
    assert got.config.sharing == "none"
    skip = ("_m.", "queue", "temp")  # training state that an HF BLIP export does not hold
    for key, value in want.state_dict().items():
        if not any(s in key for s in skip):
            torch.testing.assert_close(got.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_cli_sharing_is_a_pretrain_option_named_after_table_3(toy_dataset, tmp_path):
    from typer.testing import CliRunner

    from capfilt.cli import app

    runner = CliRunner()
    pretrain_help = runner.invoke(app, ["pretrain", "--help"], terminal_width=200).output
    assert "--sharing" in pretrain_help and "Table 3" in pretrain_help
    assert "--sharing" not in runner.invoke(app, ["finetune", "--help"]).output
    bad = runner.invoke(
        app, ["pretrain", str(toy_dataset), "--out", str(tmp_path / "r"), "--sharing", "half"]
    )
    assert bad.exit_code == 2 and "all-but-ca" in bad.output


def test_finetune_caption_trains_the_decoder_and_leaves_itm_parts_alone(
    straight_run, toy_dataset, tmp_path
):
    straight, _ = straight_run
    out = tmp_path / "cap"
    options = dict(TOY, max_steps=2, save_every=2, lr=1e-2)
    del options["preset"]
    result = train(
        TrainConfig(
            datasets=(str(toy_dataset),),
            out=str(out),
            task="caption",
            init=(str(straight),),
            **options,
        )
    )
    assert result.losses.keys() == {"lm"}
    before, _, _ = load_run(straight)
    after, _, _ = load_run(out)
    enc_before = before.text_encoder.encoder.layer[0].attention.self.query.weight
    enc_after = after.text_encoder.encoder.layer[0].attention.self.query.weight
    dec_before = before.text_decoder.bert.encoder.layer[0].attention.self.query.weight
    dec_after = after.text_decoder.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(enc_before, enc_after)  # ITC/ITM-only: frozen
    assert torch.equal(before.itm_head.weight, after.itm_head.weight)
    assert not torch.equal(dec_before, dec_after)
    assert not torch.equal(
        before.vision_model.post_layernorm.weight, after.vision_model.post_layernorm.weight
    )


def test_pretrain_can_start_from_hf_blip_checkpoints(
    tiny_captioner, tiny_filter, toy_dataset, tmp_path
):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    # One step at learning rate 0: the run's weights are exactly the initial ones.
    options = dict(TOY, max_steps=1, save_every=1, lr=0.0, min_lr=0.0, warmup_steps=0)
    del options["preset"]
    out = tmp_path / "from-hf"
    init = (str(tiny_captioner), str(tiny_filter))
    train(TrainConfig(datasets=(str(toy_dataset),), out=str(out), init=init, **options))
    model, tokenizer, meta = load_run(out)
    captioner = BlipForConditionalGeneration.from_pretrained(str(tiny_captioner))
    itm = BlipForImageTextRetrieval.from_pretrained(str(tiny_filter))
    assert meta["model_config"]["vision"]["image_size"] == itm.config.vision_config.image_size
    # The filter gives the image encoder and the shared text weights ...
    torch.testing.assert_close(
        model.vision_model.state_dict(), itm.vision_model.state_dict(), atol=0, rtol=0
    )
    torch.testing.assert_close(model.itm_head.weight, itm.itm_head.weight, atol=0, rtol=0)
    # ... the captioner its decoder's self-attention; the tokenizer comes from the checkpoint.
    torch.testing.assert_close(
        model.text_decoder.bert.encoder.layer[1].attention.state_dict(),
        captioner.text_decoder.bert.encoder.layer[1].attention.state_dict(),
        atol=0,
        rtol=0,
    )
    assert len(tokenizer) == captioner.config.text_config.vocab_size


def test_cli_export_writes_loadable_checkpoints(straight_run, tmp_path):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval
    from typer.testing import CliRunner

    from capfilt.cli import app

    straight, _ = straight_run
    result = CliRunner().invoke(app, ["export", str(straight), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "captioner" in result.output and "filter" in result.output
    BlipForConditionalGeneration.from_pretrained(str(tmp_path / "m" / "captioner"))
    BlipForImageTextRetrieval.from_pretrained(str(tmp_path / "m" / "filter"))

    missing = CliRunner().invoke(app, ["export", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "no complete checkpoint" in missing.output


def test_cli_pretrain_reports_bad_input_in_one_line(toy_dataset, tmp_path):
    from typer.testing import CliRunner

    from capfilt.cli import app

    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            str(toy_dataset),
            "--out",
            str(tmp_path / "r"),
            "--source",
            "synthetic",
            "--preset",
            "tiny",
        ],
    )
    assert result.exit_code == 2
    assert "no curated/ shards" in result.output and "Traceback" not in result.output


# --- several processes -------------------------------------------------------------------
def test_two_process_accelerate_run(toy_dataset, tmp_path):
    """`accelerate launch` with 2 CPU processes: DDP, gathered queues, per-process RNG state."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    command = [
        *accelerate_launch_on_cpu(2),
        "-m",
        "capfilt",
        "pretrain",
        str(toy_dataset),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--save-every",
        "2",
        "--queue-size",
        "32",
        "--num-workers",
        "0",
        "--warmup-steps",
        "0",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("✓ 3/3 steps") == 1  # the summary comes from the main process only
    config = json.loads((out / "config.json").read_text())
    assert config["num_processes"] == 2
    # 5 batches of 4 between two processes: 2 full rounds each (drop_last drops the odd one).
    assert config["steps_per_epoch"] == 2
    assert {p.name for p in (out / "step-3").iterdir()} >= {
        "metadata.json",
        "model.safetensors",
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    model, _, _ = load_run(out)
    # Each step enqueues both processes' batches: 3 steps × 2 × 4 features.
    assert int(model.queue_ptr) == (3 * 2 * 4) % 32
    assert not torch.allclose(model.image_queue[:, :24], model.image_queue[:, :24].mean(1, True))


def test_two_nodes_train_every_pair_once_per_epoch(tmp_path):
    """torchrun on 2 nodes × 1 process (static rendezvous on 127.0.0.1): each node traces the
    keys it trains on; across both, every pair comes once per epoch."""
    import socket
    import sys

    root = tmp_path / "ds"
    truths = write_images_dataset(root, n_shards=2, per_shard=10)  # 16 pairs: 2 × 2 × 4
    out = tmp_path / "run"  # on storage both nodes share
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for node in (0, 1):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            CAPFILT_TRACE_PAIRS=str(tmp_path / f"node{node}.txt"),
        )
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "-m",
            "capfilt",
            "pretrain",
            str(root),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--queue-size",
            "16",
            "--num-workers",
            "1",
            "--warmup-steps",
            "0",
        ]
        nodes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert config["num_processes"] == 2 and config["total_steps"] == 4
    seen: dict[int, list[str]] = {0: [], 1: []}
    ranks = set()
    for node in (0, 1):
        for line in (tmp_path / f"node{node}.txt").read_text().splitlines():
            rank, epoch, _, key = line.split()
            ranks.add((node, int(rank)))
            seen[int(epoch)].append(key)
    assert ranks == {(0, 0), (1, 1)}  # node 1 holds the second process
    everything = sorted(key for key, _ in truths)
    assert len(everything) == 16
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == everything  # once each, split between the nodes


def test_finetune_at_another_image_size_interpolates_position_embeddings(
    straight_run, toy_dataset, tmp_path
):
    import torch.nn.functional as F

    straight, _ = straight_run
    before, _, _ = load_run(straight)
    assert before.config.image_size == 64  # 8 x 8 patches of 8 px
    options = dict(TOY, max_steps=1, save_every=1, lr=0.0, min_lr=0.0, warmup_steps=0)
    del options["preset"]
    out = tmp_path / "at96"
    train(
        TrainConfig(
            datasets=(str(toy_dataset),),
            out=str(out),
            task="itm",
            init=(str(straight),),
            image_size=96,
            **options,
        )
    )
    after, _, _ = load_run(out)
    assert after.config.image_size == 96
    old = before.vision_model.embeddings.position_embedding
    new = after.vision_model.embeddings.position_embedding
    assert new.shape == (1, 1 + 12 * 12, old.shape[-1])
    torch.testing.assert_close(new[:, 0], old[:, 0])  # the class position is kept
    grid = old[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(12, 12), mode="bicubic")
    want = want.permute(0, 2, 3, 1).reshape(1, 144, -1)
    torch.testing.assert_close(new[:, 1:], want)  # lr 0: exactly the interpolation
    assert json.loads((out / "config.json").read_text())["text_tokens"] == 35  # BLIP's ITM


def test_a_given_tokenizer_is_the_vocabulary_of_a_run_from_scratch(toy_dataset, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import BertTokenizerFast

    from capfilt.models.tokenizers import bert_pipeline

    # As BERT's vocabulary comes: its specials, no [DEC] or [ENC] of BLIP's.
    words = ["a", "red", "green", "blue", "yellow", "circle", "square", "triangle"]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab = {token: i for i, token in enumerate(tokens)}
    bert = BertTokenizerFast(
        tokenizer_object=bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))),
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    bert.save_pretrained(str(tmp_path / "bert-like"))
    out = tmp_path / "run"
    options = dict(TOY, max_steps=1, save_every=1)
    tokenizer_dir = str(tmp_path / "bert-like")
    train(
        TrainConfig(datasets=(str(toy_dataset),), out=str(out), tokenizer=tokenizer_dir, **options)
    )
    model, tokenizer, _ = load_run(out)
    assert tokenizer.convert_tokens_to_ids("triangle") == vocab["triangle"]
    dec, enc = tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    assert {dec, enc} == {len(tokens), len(tokens) + 1}  # BLIP's specials, after the vocabulary
    assert model.config.text["vocab_size"] == len(tokens) + 2
    assert json.loads((out / "config.json").read_text())["text_tokens"] == 30  # BLIP's pretrain


def test_unset_rates_epochs_and_threads_follow_the_model_size():
    from capfilt.training.config import FINETUNE_DEFAULTS

    pretrain = TrainConfig(datasets=("d",), out="o")
    finetune = TrainConfig(datasets=("d",), out="o", **FINETUNE_DEFAULTS)
    tiny, base = 64, 768  # vision widths: the tiny preset, ViT-B
    assert (pretrain.lr, pretrain.epochs, pretrain.threads) == (None, None, None)
    got = {
        (name, width, cpu): (c.lr, c.epochs, c.threads)
        for name, config in (("pretrain", pretrain), ("finetune", finetune))
        for width in (tiny, base)
        for cpu in (True, False)
        for c in [config.with_recipe(width, cpu)]
    }
    assert got[("pretrain", base, True)] == (3e-4, 20, None)  # BLIP's pretraining
    assert got[("finetune", base, True)] == (1e-5, 5, None)  # BLIP's COCO finetuning
    assert got[("pretrain", tiny, True)] == (1e-3, 20, 1)
    assert got[("finetune", tiny, True)] == (1e-3, 30, 1)
    assert got[("finetune", tiny, False)] == (1e-3, 30, None)  # a GPU keeps torch's threads
    given = pretrain.replace(lr=0.5, epochs=2, threads=3).with_recipe(tiny, True)
    assert (given.lr, given.epochs, given.threads) == (0.5, 2, 3)
