"""Pretrained weights by name: `hf-hub:<org>/<repo>` and timm's names, through the HF cache.

    jvt.load_pretrained("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", params, model)
    jvt.load_pretrained("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", params, model)
    jvt.load_pretrained("hf-hub:google/vit-base-patch16-224-in21k", params, model)
    jvt.load_pretrained("hf-hub:my-org/my-vit/weights/vit.npz", params, model)  # a file in it

Accepted names:
  hf-hub:<org>/<repo>[/<file>][@<revision>]   a Hugging Face Hub repository; the file defaults
                                              to `model.safetensors` (timm and transformers)
  timm:<model>.<tag>                          timm's name, i.e. hf-hub:timm/<model>.<tag>
The file is fetched with `huggingface_hub.hf_hub_download` into the hub's cache (`HF_HUB_CACHE`,
default `$HF_HOME/hub`, `~/.cache/huggingface/hub`) and read from there afterwards; the format
is detected from the file as for a local path. With `HF_HUB_OFFLINE=1`, or without a network,
only the cache is read, and a missing file raises a FileNotFoundError that says which command
downloads it and where the cache expects it.
"""
from __future__ import annotations

import os
import re

HUB_PREFIX = "hf-hub:"
TIMM_PREFIX = "timm:"
DEFAULT_FILE = "model.safetensors"
_NAME = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?P<file>(/[\w.-]+)+)?(@(?P<revision>[\w./-]+))?$")


def is_hub_name(path) -> bool:
  """True for `hf-hub:...` and `timm:...` names (as opposed to local files)."""
  return isinstance(path, str) and path.startswith((HUB_PREFIX, TIMM_PREFIX))


def parse_hub_name(name: str) -> tuple[str, str, str | None]:
  """(repo id, file in the repo, revision or None) of an `hf-hub:` / `timm:` name."""
  if name.startswith(TIMM_PREFIX):
    rest = "timm/" + name[len(TIMM_PREFIX):]
  elif name.startswith(HUB_PREFIX):
    rest = name[len(HUB_PREFIX):]
  else:
    raise ValueError(f"{name!r} is not a hub name ({HUB_PREFIX}<org>/<repo> or "
                     f"{TIMM_PREFIX}<model>.<tag>).")
  match = _NAME.match(rest)
  if match is None:
    raise ValueError(f"{name!r}: expected {HUB_PREFIX}<org>/<repo>[/<file>][@<revision>] or "
                     f"{TIMM_PREFIX}<model>.<tag>, e.g. "
                     "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k.")
  filename = (match["file"] or "/" + DEFAULT_FILE)[1:]
  return match["repo"], filename, match["revision"]


def cache_dir() -> str:
  """The hub cache folder the environment selects now (HF_HUB_CACHE, else $HF_HOME/hub)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
  return os.path.join(os.path.expanduser(home), "hub")


def _offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(name: str) -> str:
  """The local path of the hub file `name`, downloaded into the cache unless it is there."""
  repo, filename, revision = parse_hub_name(name)
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{name}: loading by name needs huggingface_hub: "
                      "pip install huggingface_hub") from None
  folder = cache_dir()
  offline = _offline()
  try:
    return huggingface_hub.hf_hub_download(repo, filename, revision=revision,
                                           cache_dir=folder, local_files_only=offline)
  except errors.HfHubHTTPError as err:  # the hub answered: no such repository, file or access
    raise FileNotFoundError(f"{name}: the hub could not give {filename} of {repo}: {err}. "
                            "Check the repository and file names (and a token for gated "
                            "repositories: `hf auth login`).") from err
  except (errors.LocalEntryNotFoundError, OSError) as err:  # offline and not cached
    where = os.path.join(folder, f"models--{repo.replace('/', '--')}")
    rev = f" --revision {revision}" if revision else ""
    raise FileNotFoundError(
        f"{name}: {filename} of {repo} is not in the Hugging Face cache ({where}) and "
        f"{'the hub is offline (HF_HUB_OFFLINE=1)' if offline else 'the hub is unreachable'}. "
        f"On a machine with a network run `hf download {repo} {filename}{rev} "
        f"--cache-dir {folder}` (or `HF_HUB_CACHE=DIR hf download ...` and copy DIR here "
        f"as HF_HUB_CACHE), or download the file anywhere and pass its path instead.") from err
