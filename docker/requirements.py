"""Print moetrain's requirements for an image that already has torch: the dependencies and the dev extra (for
docker/smoke.sh), torch left out so that pip keeps the image's own build (NVIDIA's 2.9.0a0+... does not satisfy
``torch>=2.9``, and pip would install a second torch with its CUDA wheels)."""

import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower() != "torch":
        print(requirement.split("#")[0].strip())
