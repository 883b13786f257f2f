"""`python -m stylize.list [--bank PATH] [--sheet OUT.png] [--photo NAME]`: the bank's styles, and a contact sheet."""
from __future__ import annotations

from common.signals import STARTING, leaving, on_stop_signals  # light: what follows them is not

if __name__ == "__main__":  # a stop signal while torch loads: one line, not a traceback; main's own handlers follow
    on_stop_signals(leaving(STARTING))

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from common.arguments import last_output, reports_user_errors
from common.errors import OutputError
from common.outputs import AtomicOutput, check_output
from stylize.apply import stylize_frames
from stylize.bank import SAMPLE_PHOTOS, StyleBank, sample_photo

LABEL_HEIGHT = 14
SHEET_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".webp")
PALETTE_SUFFIXES = (".png", ".gif")  # --colors applies to these; the others are written in full colour


def contact_sheet(bank: StyleBank, photo: torch.Tensor, tile: int = 128, columns: int = 7) -> Image.Image:
    """The photo and every style applied to it (at 2× tile size, shrunk), labelled, on a white grid."""
    h, w = photo.shape[-2:]
    scale = 2 * tile / max(h, w)
    size = (max(16, round(h * scale)), max(16, round(w * scale)))
    work = F.interpolate(photo[None].float(), size=size, mode="bilinear", antialias=True).round().to(torch.uint8)
    tiles = [("original", work[0].float() / 255)]
    for i in tqdm(range(len(bank)), desc="contact sheet", unit="style"):
        out = stylize_frames(bank.network, work, F.one_hot(torch.tensor([i]), len(bank)).float(), precision="fp32")
        tiles.append((f"{i} {bank.names[i]}", out[0].cpu()))
    th, tw = round(size[0] / 2), round(size[1] / 2)
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (tw + 4) + 4, rows * (th + LABEL_HEIGHT + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (label, image) in enumerate(tiles):
        small = F.interpolate(image[None], size=(th, tw), mode="bilinear", antialias=True)[0]
        pixels = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        r, c = divmod(n, columns)
        x, y = 4 + c * (tw + 4), 4 + r * (th + LABEL_HEIGHT + 4)
        draw.text((x + 1, y + 1), label, fill="black")
        sheet.paste(Image.fromarray(pixels), (x, y + LABEL_HEIGHT))
    return sheet


def save_image_atomic(image: Image.Image, path: Path, overwrite: bool = False) -> None:
    with AtomicOutput(path, overwrite=overwrite) as temp:
        image.save(temp, optimize=True)


def check_sheet(sheet: Path, overwrite: bool) -> Path:
    """The sheet's absolute path, refused (one line) now, not after every style has run: a folder, an unknown
    image type, a folder that cannot be made, and an existing file without --overwrite."""
    target = check_output(sheet, overwrite=True, suffixes=SHEET_SUFFIXES, kind="image type")
    if target.exists() and not overwrite:  # check_output's own words name the render's overwrite=true
        raise OutputError(f"output {target} already exists: pass --overwrite to replace it")
    return target


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stylize.list", description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=None,
                        help="style bank file (default .cache/styles/multistyle26.pt)")
    parser.add_argument("--sheet", type=Path, default=None, help="write a contact sheet of every style to this PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --sheet file")
    parser.add_argument("--photo", default="astronaut", choices=SAMPLE_PHOTOS, metavar="NAME",
                        help=f"scikit-image photo for the sheet: {', '.join(SAMPLE_PHOTOS)} (default %(default)s)")
    parser.add_argument("--tile", type=int, default=128, help="tile size in the sheet, px")
    parser.add_argument("--colors", type=int, default=256,
                        help="palette size of a PNG or GIF sheet, 1-256 (keeps it small for docs; 0 = full colour)")
    args = parser.parse_args(argv)
    if not 0 <= args.colors <= 256 or args.tile < 16:
        parser.error("--colors takes 0 to 256 and --tile at least 16")
    if args.sheet is not None:
        args.sheet = check_sheet(args.sheet, args.overwrite)
    bank = StyleBank.load(args.bank)
    for i, style in enumerate(bank.styles):
        print(f"{i:3d}  {style.name:24s}  {style.source}")
    if args.sheet is not None:
        sheet = contact_sheet(bank, sample_photo(args.photo), args.tile)
        if args.colors and args.sheet.suffix.lower() in PALETTE_SUFFIXES:
            sheet = sheet.quantize(args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        last_output(args.sheet)
        save_image_atomic(sheet, args.sheet, args.overwrite)
        print(f"wrote {args.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
