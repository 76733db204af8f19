"""Every job request a page starts renders argv that the real command line reads back as meant."""

from __future__ import annotations

import pytest

from neuroviz.analysis import AnalysisConfig, ImportanceConfig
from neuroviz.cli import build_parser
from neuroviz.requests import AnalyzeRequest, DemoRequest, EditRequest, ExtractRequest, LabelRequest, LayersRequest, SynthesizeRequest
from neuroviz.synthesis import NeuronTarget, SynthesisConfig, SynthesisError, SynthesisRequest


def parsed(request):
    """The argparse namespace of ``python -m neuroviz <request.argv()>``."""
    return build_parser().parse_args(request.argv())


def test_extract_request():
    args = parsed(ExtractRequest("offline:mobilenet_v2", "/data/my images", ("features.4", "features.14"), "max", 20, 8))
    assert (args.command, args.model, args.probe, args.layers) == ("extract", "offline:mobilenet_v2", "/data/my images",
                                                                   "features.4,features.14")
    assert (args.pooling, args.k, args.batch_size) == ("max", 20, 8)
    assert parsed(ExtractRequest("m", "demo")).layers is None  # no layers: the model's suggested ones


def test_label_request():
    args = parsed(LabelRequest("torchvision:resnet18@random", "demo", ("layer2", "layer4"), ("clip_dissect", "dnd"),
                               " 0-3, 7", "imagenet"))
    assert (args.command, args.model, args.probe) == ("label", "torchvision:resnet18@random", "demo")
    assert (args.layers, args.methods, args.neurons, args.concepts) == ("layer2,layer4", "clip_dissect,dnd", "0-3,7", "imagenet")
    defaults = parsed(LabelRequest("m", "demo", ("l",), ("milan",)))
    assert defaults.neurons is None and defaults.concepts == "words20k"  # the command's own default


def test_synthesize_request_round_trips_the_request():
    from neuroviz.cli.synthesize import request_from_args

    request = SynthesisRequest(layer="layer2", neuron=3, levels=(1 / 3, 0.9), also=(NeuronTarget("layer4", 2, (0.25,)),),
                               n_samples=3, start="probe", seed=5, config=SynthesisConfig(steps=16, lr=0.013, image_size=64))
    args = parsed(SynthesizeRequest(request, "torchvision:resnet18@random", "run123"))
    assert (args.command, args.model, args.run_key) == ("synthesize", "torchvision:resnet18@random", "run123")
    assert request_from_args(args) == request
    with pytest.raises(SynthesisError, match="cannot set check_every"):
        SynthesizeRequest(request.with_config(check_every=3), "m", "run123").argv()


def test_analyze_request_round_trips_both_configs():
    from neuroviz.cli.analyze import analysis_config as cli_analysis_config
    from neuroviz.cli.analyze import importance_config as cli_importance_config

    config = AnalysisConfig(counting="fractional", unlabelled="uninterpretable", min_calibrated=0.35, embedding_fallback=True)
    importance = ImportanceConfig(mode="mean", max_images=64, random_baseline=False)
    args = parsed(AnalyzeRequest("offline:mobilenet_v2", "demo", "milan", config, importance, ("features.14",)))
    assert (args.command, args.model, args.probe, args.importance, args.layers) == (
        "analyze", "offline:mobilenet_v2", "demo", "milan", "features.14")
    assert cli_analysis_config(args) == config and cli_importance_config(args) == importance
    every = parsed(AnalyzeRequest("m", "demo", "clip_dissect", importance=ImportanceConfig(max_images=None)))
    assert every.layers is None and cli_importance_config(every).max_images is None
    assert AnalyzeRequest.kind == "importance"


def test_edit_request_round_trips_the_neurons():
    from neuroviz.editing import parse_neuron_list

    neurons = {"layer4": [0, 2, 4], "features.14": [7], "empty": []}
    args = parsed(EditRequest.of("torchvision:resnet18@random", "ps123", "no text", neurons, "mean", 10, 3))
    assert (args.command, args.model, args.probe, args.name, args.mode) == (
        "edit", "torchvision:resnet18@random", "ps123", "no text", "mean")
    assert parse_neuron_list(args.neurons) == {"layer4": [0, 2, 4], "features.14": [7]}
    assert (args.max_images, args.random_groups, args.save) == (10, 3, False)
    every = parsed(EditRequest.of("m", "ps", "x", {"l": [1]}))
    assert every.max_images is None and every.random_groups == 0 and every.mode == "zero"


def test_demo_and_layers_requests():
    assert parsed(DemoRequest()).command == "demo"
    args = parsed(LayersRequest("timm:resnet18"))
    assert (args.command, args.model) == ("layers", "timm:resnet18")
    kinds = [r.kind for r in (ExtractRequest("m", "p"), LabelRequest("m", "p", (), ()), DemoRequest(), LayersRequest("m"))]
    assert kinds == ["extract", "label", "demo", "layers"]
