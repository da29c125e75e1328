"""WaveCLIP: the files every saved checkpoint carries (configuration, modeling, image processing, pipeline and
what they import). They import only runtime packages (torch, transformers, numpy, PIL, ptwt, PyWavelets), because
they run inside users' environments under the user's transformers release. This `__init__` is not shipped."""
