"""Hugging Face Space / local entry point: `python app.py` serves the app on http://127.0.0.1:7860.

The model comes from ./checkpoints, or from $BRAINTUMOR_FLAX_MODEL (a folder or a Hub repo id).
Everything else lives in `braintumor_flax.serve.app_ui` (layout, endpoints) and `braintumor_flax.serve.service`.
"""

from __future__ import annotations

import importlib
import os
import threading
import time

_START = time.perf_counter()


def main() -> None:
    # Importing Gradio takes seconds of mostly-Python work; let it overlap with loading and compiling
    # the model (XLA compiles without the GIL) instead of adding to the cold start.
    ui_import = threading.Thread(target=importlib.import_module, args=("gradio",), name="import-gradio")
    ui_import.start()

    import jax

    from braintumor_flax.paths import cache_dir

    # Compiled programs persist across restarts (a restarted Space or local run skips most compile time).
    jax.config.update("jax_compilation_cache_dir", str(cache_dir("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from braintumor_flax.serve.service import BrainTumorService

    t_import = time.perf_counter()
    service = BrainTumorService.from_pretrained(warm_up=False)
    t_load = time.perf_counter()
    service.warm_up()  # compile the single-image path before serving
    t_compile = time.perf_counter()
    ui_import.join()
    from braintumor_flax.serve.app_ui import build_demo, configure_queue, launch_kwargs

    demo = configure_queue(build_demo(service))
    print(f"model {service.model_version} ready in {time.perf_counter() - _START:.1f} s (imports "
          f"{t_import - _START:.1f} s, load {t_load - t_import:.1f} s, compile {t_compile - t_load:.1f} s, "
          f"UI {time.perf_counter() - t_compile:.1f} s)", flush=True)
    # The batch path compiles while the server already answers single images.
    threading.Thread(target=service.warm_up_batch, name="warm-up-batch", daemon=True).start()
    from gradio.utils import get_upload_folder

    from braintumor_flax.serve.request_limits import TempSweeper

    TempSweeper(get_upload_folder()).start()  # uploads bounded in total size too, not only by age
    # On a Space GRADIO_SERVER_NAME=0.0.0.0 is set for us; locally we stay on loopback.
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), **launch_kwargs())


if __name__ == "__main__":
    main()
