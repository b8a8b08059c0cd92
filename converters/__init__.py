"""dynamo-export, ONNX side: export a DynaMo checkpoint to a verified, self-describing ONNX artifact."""
