"""`charrnn export`: a trained model as one ONNX file (`onnx`, with `OnnxModel` to run one),
or as one offline web page (`page`, from `webpage.html` and the WebAssembly kernel in web/).

May import: the shared top-level modules, charrnn.data, charrnn.model, charrnn.store and
charrnn.infer. Never charrnn.training.
"""
