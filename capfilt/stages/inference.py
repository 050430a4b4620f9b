"""What caption and filter share: the options of running a BLIP model over images/ shards,
declared once, and the base of their stages (model identity in the provenance, the record).
"""

from __future__ import annotations

from capfilt.core.options import option
from capfilt.core.provenance import UNRESOLVED
from capfilt.images.batches import count_successful, resolve_workers
from capfilt.models.blip import ENGINES, PRECISIONS
from capfilt.stages.runner import Stage

# --- options both commands take, each declared once ---------------------------------------------


def batch_size_option():
    return option(32, "Images per forward pass.", ge=1)


def precision_option():
    # Compared as given: "auto" on a GPU and on a laptop count as the same option.
    return option(
        "auto",
        "Weights and activations: auto is bf16 on GPU, fp32 on CPU.",
        choices=PRECISIONS,
        output=True,
    )


def device_option():
    return option("auto", "auto (this process's GPU under accelerate launch), cpu, cuda:N.")


def workers_option():
    return option(
        None,
        "Processes decoding JPEGs; 0: threads of the main process. "
        "Default: 0 on CPU; on GPU the CPU cores less 2 (2 to 16).",
        ge=0,
        flag="--workers",
    )


def threads_option():
    return option(
        None,
        "CPU only: torch threads for the model, one thread decoding beside it. Default: "
        "measured on each shard's first batch: every core with decoding inline when it is "
        "cheap beside the model, else the cores less a decoding thread.",
        ge=1,
    )


def engine_option(output: bool):
    """`output`: captions sample differently on the two engines; ITM scores agree (1e-4)."""
    return option(
        "fast",
        "fast: SDPA, image keys/values once per image, no per-token syncs; "
        "hf: the plain transformers modules (the reference).",
        choices=ENGINES,
        output=output,
    )


def fast_decode_option():
    return option(
        False,
        "Decode JPEGs at 1/2, 1/4 or 1/8 scale when the model's input is that small: "
        "much faster, pixels slightly different from the full decode + resize.",
        output=True,
    )


def gpu_decode_option():
    return option(
        False,
        "Decode plain JPEGs on the model's device with torchvision (nvJPEG on a GPU) and "
        "resize them there; other images take the PIL path. Needs torchvision.",
    )


def overwrite_option():
    return option(
        False,
        "Redo every shard, also those done, or made with other options (which are refused "
        "without it).",
    )


# --- the stage base ------------------------------------------------------------------------------
class ModelStage(Stage):
    """A stage that runs one BLIP checkpoint over the downloaded images of each shard."""

    unit = "images"

    def __init__(self, options, model=None):
        super().__init__(options)
        self.model = model  # loaded by setup() unless given
        self._revision = None

    def revision(self) -> str:
        """The checkpoint's revision (hub commit, or a hash of a local folder's files), or
        UNRESOLVED when the model is not on this machine (nothing is downloaded to tell)."""
        if self._revision is None:
            if self.model is not None:
                self._revision = self.model.source.revision
            else:
                from capfilt.models.blip import local_revision

                self._revision = local_revision(self.options.model) or UNRESOLVED
        return self._revision

    def provenance_options(self) -> dict:
        from capfilt.models.blip import model_name

        options = self.options.output_options()
        options["model"] = model_name(self.options.model)
        options["model_revision"] = self.revision()
        return options

    def settled(self, options: dict) -> dict:
        if options.get("model_revision") == UNRESOLVED and self.model is not None:
            return dict(options, model_revision=self.model.source.revision)
        return options

    def work(self, dataset, shards: list[int]) -> int:
        return count_successful(dataset, shards)

    def run_record(self) -> dict:
        from capfilt.models.blip import model_record

        record = {
            "model": dict(model_record(self.model, self.options.model), revision=self.revision())
        }
        if self.model is not None:
            record["decoding_workers"] = resolve_workers(
                self.options.num_workers, self.model.device
            )
        return record
