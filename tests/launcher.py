"""Run fine_tuning.py exactly as a user does, with three test-only changes made explicit here.

    python tests/launcher.py [fine_tuning.py options]

1. The network is cut: any download raises URLError, so no test can download.
2. If FT_TEST_MD5 names a JSON file, CIFAR-10's expected md5 sums are replaced by the
   sums of the tiny test files (the real ones cannot match them). Verification still
   runs: a file changed after it was written fails it, as a damaged download would.
3. If FT_TEST_NO_MATPLOTLIB=1, importing matplotlib fails, as if it were not installed.
"""

import json
import os
import runpy
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch.hub

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_cifar10 import trust_test_md5  # noqa: E402


def no_network(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


urllib.request.urlopen = no_network
torch.hub.urlopen = no_network

if os.environ.get("FT_TEST_MD5"):
    trust_test_md5(json.loads(Path(os.environ["FT_TEST_MD5"]).read_text()))

if os.environ.get("FT_TEST_NO_MATPLOTLIB") == "1":
    sys.modules["matplotlib"] = None  # `import matplotlib` now raises ImportError

script = Path(__file__).resolve().parent.parent / "fine_tuning.py"
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
