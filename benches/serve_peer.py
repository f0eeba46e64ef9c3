"""The peer for benches/serve_load.rs: the same Fashion-MNIST CNN served the common Python way,
a grpcio server answering cohort.v1.Inference/Predict with ONNX Runtime, one forward pass per
request (ONNX Runtime sessions are thread-safe; grpcio runs handlers on a thread pool).

    python serve_peer.py --weights model.safetensors --proto-dir protocol/proto

It builds the ONNX graph from cohort's safetensors file (Burn's layout: Linear weights are
[in, out]), listens on a free loopback port and prints "listening on PORT".
"""

import argparse
import os
import sys
import tempfile
from concurrent import futures

import grpc
import numpy as np
import onnx
import onnxruntime as ort
from grpc_tools import protoc
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file


def cnn_onnx(w, h=28, width=28):
    """cohort's CNN: conv3x3(8) relu pool2, conv3x3(16) relu pool2, fc 64 relu, fc classes."""
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    shape = numpy_helper.from_array(np.array([-1, 1, h, width], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x4"]),
        helper.make_node("Conv", ["x4", "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], axis=1),
        # Burn's Linear: y = x W + b with W [in, out].
        helper.make_node("MatMul", ["f", "fc1.weight"], ["m1"]),
        helper.make_node("Add", ["m1", "fc1.bias"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "fc2.weight"], ["m2"]),
        helper.make_node("Add", ["m2", "fc2.bias"], ["logits"]),
    ]
    classes = w["fc2.bias"].shape[0]
    graph = helper.make_graph(
        nodes,
        "cohort-cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, h * width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, classes])],
        inits + [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="cohort-peer-stubs")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(proto_dir, "cohort/v1/inference.proto"),
        ]
    )
    if rc != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    from cohort.v1 import inference_pb2, inference_pb2_grpc

    return inference_pb2, inference_pb2_grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--threads", type=int, default=32, help="grpcio handler threads")
    a = ap.parse_args()
    pb, pb_grpc = stubs(a.proto_dir)
    w = load_file(a.weights)
    opts = ort.SessionOptions()
    session = ort.InferenceSession(cnn_onnx(w), opts, providers=["CPUExecutionProvider"])

    class Inference(pb_grpc.InferenceServicer):
        def Predict(self, request, context):
            x = np.asarray(request.example.features, dtype=np.float32).reshape(1, -1)
            logits = session.run(["logits"], {"x": x})[0][0]
            e = np.exp(logits - logits.max())
            p = e / e.sum()
            return pb.PredictResponse(
                prediction=pb.Prediction(
                    **{"class": int(logits.argmax())},
                    probabilities=p.tolist(),
                    logits=logits.tolist(),
                ),
                model=pb.ServedModel(job_id="peer", version=0, variant="a", precision="f32", device="onnxruntime-cpu"),
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=a.threads))
    pb_grpc.add_InferenceServicer_to_server(Inference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
