"""Stand-in of AUTOMATIC1111 v1.10.1 scripts/xyz_grid.py (Forge's is the same in these parts): AxisOption and its
txt2img/img2img kinds (:214-236), the module-level `axis_options` list (:238), `Script.ui` copying it into
`current_axis_options` (:420) and `Script.run` with two axes: values from the dropdown for an axis with
choices or from the comma-separated text (:546-553; the ranges of :555-600 are left out), converted with the
axis type, `confirm` before the first image (:602-613), then per cell a shallow copy of p, each axis' `apply`
and process_images (:711-716). `run` returns the cells' Processed, x fastest (the grid drawing is left out).
"""
import csv
from copy import copy
from io import StringIO

from modules import processing, scripts


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class AxisOptionImg2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


def do_nothing(p, x, xs):
    pass


axis_options = [
    AxisOption("Nothing", str, do_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOptionTxt2Img("Hires steps", int, apply_field("hr_second_pass_steps")),
    AxisOptionImg2Img("Image CFG Scale", float, apply_field("image_cfg_scale")),
]


def csv_string_to_list_strip(data_str):
    return [s.strip() for row in csv.reader(StringIO(data_str), skipinitialspace=True) for s in row]


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        self.current_axis_options = [x for x in axis_options if type(x) == AxisOption or x.is_img2img == is_img2img]
        return []

    def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, csv_mode=False):
        def process_axis(opt, vals, vals_dropdown):
            if opt.label == "Nothing":
                return [0]
            if opt.choices is not None and not csv_mode:
                valslist = vals_dropdown
            else:
                valslist = csv_string_to_list_strip(vals)
            valslist = [opt.type(x) for x in valslist]
            if opt.confirm:
                opt.confirm(p, valslist)
            return valslist

        x_opt, y_opt = self.current_axis_options[x_type], self.current_axis_options[y_type]
        xs = process_axis(x_opt, x_values, x_values_dropdown)
        ys = process_axis(y_opt, y_values, y_values_dropdown)
        cells = []
        for y in ys:
            for x in xs:
                pc = copy(p)
                x_opt.apply(pc, x, xs)
                y_opt.apply(pc, y, ys)
                cells.append((pc, processing.process_images(pc)))
        return cells
