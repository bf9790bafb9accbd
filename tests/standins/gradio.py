"""A recording stand-in of the gradio 3.41 / 4.x constructors the extension's ui() uses.

Each component keeps its constructor kwargs (`.kwargs`) and `.value`; blocks are context managers that collect
their children; `.click/.change` record (fn, inputs, outputs); `update(**kw)` returns a dict like gradio's.
"""
_stack = []
created = []


def update(**kwargs):
    return {"__type__": "generic_update", **kwargs}


class Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.children, self.events = args, kwargs, [], []
        if _stack:
            _stack[-1].children.append(self)
        created.append(self)

    def __enter__(self):
        _stack.append(self)
        return self

    def __exit__(self, *exc):
        _stack.pop()

    def _event(self, kind, fn=None, inputs=None, outputs=None, **kw):
        self.events.append((kind, fn, inputs, outputs, kw))

    def click(self, fn=None, inputs=None, outputs=None, **kw):
        self._event("click", fn, inputs, outputs, **kw)

    def change(self, fn=None, inputs=None, outputs=None, **kw):
        self._event("change", fn, inputs, outputs, **kw)


class Component(Block):
    def __init__(self, value=None, **kwargs):
        super().__init__(**kwargs)
        self.value = value
        self.label = kwargs.get("label")
        self.elem_id = kwargs.get("elem_id")


class Checkbox(Component):
    def __init__(self, value=False, **kwargs):
        super().__init__(value=value, **kwargs)


class Dropdown(Component):
    def __init__(self, choices=None, value=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.choices = list(choices or [])


class Radio(Dropdown):
    pass


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, step=None, value=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Textbox(Component):
    def __init__(self, value="", lines=1, **kwargs):
        super().__init__(value=value, **kwargs)


class Image(Component):
    def __init__(self, value=None, type="numpy", **kwargs):
        super().__init__(value=value, **kwargs)
        self.type = type


class Button(Component):
    pass


class HTML(Component):
    pass


class Row(Block):
    pass


class Column(Block):
    pass


class Accordion(Block):
    pass


class Blocks(Block):
    pass
