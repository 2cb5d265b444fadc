"""Print the facts about the installed torch that CMakeLists.txt needs, as `KEY=VALUE` lines."""
import os
import re
import sys

import torch

site = os.path.dirname(os.path.dirname(torch.__file__))
nvidia = os.path.join(site, "nvidia")
# CUDA wheels of torch >= 2.9 ship the toolkit's extra headers/libs under nvidia/cu<major>.
cu_dirs = []
if torch.version.cuda and os.path.isdir(nvidia):
    major = torch.version.cuda.split(".")[0]
    for cand in (os.path.join(nvidia, f"cu{major}"), *(os.path.join(nvidia, d) for d in sorted(os.listdir(nvidia)))):
        if os.path.isdir(os.path.join(cand, "include")):
            cu_dirs.append(cand)
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_DIR={os.path.dirname(torch.__file__)}")
print(f"TORCH_CUDA={torch.version.cuda or ''}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# The C++ standard torch's own CMake config asks of its consumers (17 for torch 2.11, 20 for 2.13, whose headers
# refuse anything older); the version cut-off is only the fallback for an install without that file.
config = os.path.join(os.path.dirname(torch.__file__), "share", "cmake", "Torch", "TorchConfig.cmake")
found = re.search(r"CXX_STANDARD\s+(\d+)", open(config).read()) if os.path.isfile(config) else None
print(f"TORCH_CXX_STANDARD={found.group(1) if found else (20 if (major, minor) >= (2, 13) else 17)}")
print("TORCH_NVIDIA_INCLUDE=" + ",".join(os.path.join(d, "include") for d in cu_dirs))
print("TORCH_NVIDIA_LIB=" + ",".join(os.path.join(d, "lib") for d in cu_dirs if os.path.isdir(os.path.join(d, "lib"))))
sys.stdout.flush()
