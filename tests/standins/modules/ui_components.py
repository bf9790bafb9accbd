"""Stand-in of modules/ui_components.py: InputAccordion(value, **kwargs) is a Checkbox used as a context (ui_components.py:88-144)."""
import gradio as gr  # the tests give a recording gradio stand-in (tests/standins/gradio.py)


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(**{**kwargs, "open": value})

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)
