"""The torch-free names in pyrovae.choices are the registries' keys."""

from pyrovae import choices, config, data, guides, likelihoods, nets, objectives, priors


def test_each_name_tuple_is_its_registrys_keys():
    registries = {
        "DATASETS": data.DATASETS,
        "SPLITS": data.SPLITS,
        "BINARIZE": data.BINARIZE,
        "NETS": nets.NETS,
        "ACTIVATIONS": nets.ACTIVATIONS,
        "MODELS": config.MODELS,
        "PRIORS": priors.PRIORS,
        "GUIDES": guides.GUIDES,
        "LIKELIHOODS": likelihoods.LIKELIHOODS,
        "LOSSES": objectives.LOSSES,
    }
    for name, registry in registries.items():
        assert getattr(choices, name) == tuple(registry), name
    assert set(choices.__all__) == {*registries, "STREAM"}
