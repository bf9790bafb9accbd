"""Stand-in of modules/extra_networks.py (v1.10.1), written from its documented behaviour:
- a registry keyed by `name`, cleared by `initialize()` (:13-23);
- `ExtraNetworkParams(items)`: an item with exactly one '=' is named, anything else positional (:31-45);
- `activate(p, data)`: the mentioned networks get their params, every other registered network gets [] (:126-150);
- `deactivate(p, data)`: every registered network once (:153-172);
- `parse_prompt`: every `<word:args>` is removed from the prompt and collected, args split at ':' (:175-191);
  `parse_prompts` keeps the first prompt's networks for the whole batch (:194-206);
- `get_user_metadata(filename)`: the JSON beside the file (`<basename>.json`), {} when there is none (:209-225).
"""
import json
import os
import re
from collections import defaultdict

extra_network_registry = {}
extra_network_aliases = {}


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            key, sep, value = item.partition("=") if isinstance(item, str) else (item, "", "")
            if sep and "=" not in value:
                self.named[key] = value
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def _lookup(data):
    found = {}
    for name, params in data.items():
        net = extra_network_registry.get(name) or extra_network_aliases.get(name)
        if net is not None:
            found.setdefault(net, []).extend(params)
    return found


def activate(p, extra_network_data):
    mentioned = _lookup(extra_network_data)
    for net, params in mentioned.items():
        net.activate(p, params)
    for net in list(extra_network_registry.values()):
        if net not in mentioned:
            net.activate(p, [])


def deactivate(p, extra_network_data):
    for net in list(extra_network_registry.values()):
        net.deactivate(p)


TAG = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    found = defaultdict(list)

    def take(m):
        found[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return TAG.sub(take, prompt), found


def parse_prompts(prompts):
    cleaned, first = [], None
    for prompt in prompts:
        text, data = parse_prompt(prompt)
        if first is None:
            first = data
        cleaned.append(text)
    return cleaned, first


def get_user_metadata(filename, lister=None):
    if filename is None:
        return {}
    metadata_filename = os.path.splitext(filename)[0] + ".json"
    metadata = {}
    if os.path.exists(metadata_filename):
        with open(metadata_filename, "r", encoding="utf8") as file:
            metadata = json.load(file)
    return metadata
