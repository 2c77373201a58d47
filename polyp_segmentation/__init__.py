"""The code this repository's scripts, app, benchmarks and tests share: data (`data`), metrics (`metrics`), safe
loading (`loading`), inference (`inference`), exported models run like the model (`runtimes`: ONNX Runtime,
OpenVINO), int8 quantization (`quantization`), video (`video`), drawing (`drawing`), ONNX export (`onnx_export`), the
shared command-line arguments (`cli`), the training loop (`training`), checkpoints (`checkpoints`), the Hub pusher
(`hub`), renderings of measurements (`reports`) and what the tests and benchmarks share (`testing`). The model itself
lives in the remote-code files at the repository's root, which `trust_remote_code` loads on its own."""
