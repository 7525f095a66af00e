"""Re-calibrate with 8-bit group params at group 32 known to the calibrator (scratch).

    python benchmarks/experiments/group_params_8bit/recal8.py RECIPE ENCODING OUT.json

Patches (in this process only): the calibrator's cost model charges INT4 group-32 sides
4 + 16/32 = 4.5 bits (per-token INT4 and INT8 keep fp16 params), and its error model
(stats._fake_quant_fast) round-trips INT4 group-32 candidates through ENCODING.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import params8  # noqa: E402

import sawquant.calibration.select as sel  # noqa: E402
import sawquant.calibration.stats as stats  # noqa: E402
from sawquant import data  # noqa: E402
from sawquant.calibration import calibrate, load_recipe  # noqa: E402
from sawquant.config import bits_per_element as _bpe  # noqa: E402
from sawquant.models import load_model  # noqa: E402

recipe_name, enc, out = sys.argv[1:4]
rt = params8.ENCODINGS[enc]


def bpe(bits, group_size, head_dim):
    if bits == 4 and group_size == 32 and head_dim != 32:
        # +1e-6: the selector only takes upgrades that cost > 0 bits (a free upgrade is skipped)
        return 4 + 16 / 32 + 1e-6
    return _bpe(bits, group_size, head_dim)


_fast = stats._fake_quant_fast


def fast(x, bits, group_size):
    if bits == 4 and group_size == 32:
        return rt(x, 32)
    return _fast(x, bits, group_size)


sel.bits_per_element = bpe
stats._fake_quant_fast = fast

model, tok = load_model(None, device_map="cpu")
recipe = load_recipe(recipe_name)
if abs(recipe.max_avg_bits - 4.5) < 1e-9:  # room for the +1e-6 per g32 side, no more
    recipe = recipe.replace(max_avg_bits=4.5 + 2e-6)
windows = data.token_windows(
    tok, data.load_text(recipe.data), num=recipe.samples, seq_len=recipe.seq_len
)
t = time.perf_counter()
res = calibrate(model, tok, windows, recipe, data_name=recipe.data)
res.save(out)
cfg = res.config
n32 = sum(getattr(lc, s).group_size == 32 for lc in cfg.layers for s in "kv")
fb = sum(len(getattr(lc, s).fallback_heads) for lc in cfg.layers for s in "kv")
whole = sum(getattr(lc, s).bits != 4 for lc in cfg.layers for s in "kv")
print(
    f"{recipe_name}/{enc}: {time.perf_counter() - t:.0f}s, g32 sides {n32}/60, fallback heads "
    f"{fb}, whole-side fallbacks {whole}, fp16-accounting bits {res.avg_bits:.3f}"
)
for i, lc in enumerate(cfg.layers):
    print(
        i,
        {
            s: (
                getattr(lc, s).bits,
                getattr(lc, s).rotation_block,
                getattr(lc, s).sign_seed,
                getattr(lc, s).group_size,
                dict(getattr(lc, s).fallback_heads),
                getattr(lc, s).center is not None,
                getattr(lc, s).smooth is not None,
            )
            for s in "kv"
        },
    )
