"""The request of the ``ideogram-remix`` provider (the legacy remix relay).

The relay takes Ideogram's own ``image_request`` object plus the source image as bytes
in the same multipart body. The source image is therefore always a stored blob
(:class:`worker.store.blobs.BlobRef`): a worker never downloads a URL a user gave it, so
``image_url`` and the reference-image fields of the kie.ai model are refused here with a
line saying so, before anything is written or sent.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    model_validator,
)

from worker.fields import BlobRef, not_a_boolean, not_blank

PROVIDER = "ideogram-remix"
DEFAULT_MODEL = "V_2"
MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**31 - 1
#: Fields of the kie.ai request that name images by URL (never fetched by a worker).
URL_FIELDS = ("image_url", "reference_image_urls", "reference_image_files", "image_urls")
RESOLUTION = re.compile(r"^RESOLUTION_[1-9][0-9]{2,3}_[1-9][0-9]{2,3}$")
HEX_COLOUR = re.compile(r"^#[0-9A-Fa-f]{6}$")

AspectRatio = Literal[
    "ASPECT_10_16",
    "ASPECT_16_10",
    "ASPECT_9_16",
    "ASPECT_16_9",
    "ASPECT_3_2",
    "ASPECT_2_3",
    "ASPECT_4_3",
    "ASPECT_3_4",
    "ASPECT_1_1",
    "ASPECT_1_3",
    "ASPECT_3_1",
]
PaletteName = Literal[
    "EMBER", "FRESH", "JUNGLE", "MAGIC", "MELON", "MOSAIC", "PASTEL", "ULTRAMARINE"
]


def _hex_colour(value: str) -> str:
    if not HEX_COLOUR.fullmatch(value):
        raise ValueError("must be a colour like #1A2B3C")
    return value


def _resolution(value: str) -> str:
    if not RESOLUTION.fullmatch(value):
        raise ValueError("must look like RESOLUTION_1024_1024")
    return value


Weight = Annotated[float, BeforeValidator(not_a_boolean), Field(ge=0.05, le=1.0)]


class PaletteMember(BaseModel):
    model_config = ConfigDict(extra="forbid")

    color_hex: Annotated[str, AfterValidator(_hex_colour)]
    color_weight: Weight | None = None


class ColorPalette(BaseModel):
    """A preset palette (``name``) or the colours themselves (``members``), not both."""

    model_config = ConfigDict(extra="forbid")

    name: PaletteName | None = None
    members: list[PaletteMember] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> ColorPalette:
        if (self.name is None) == (self.members is None):
            raise ValueError("give either name or members")
        return self


class IdeogramRemixRequest(BaseModel):
    """A job for the relay: Ideogram's ``image_request`` fields plus the source image."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, AfterValidator(not_blank)] = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS
    )
    image_file: BlobRef
    aspect_ratio: AspectRatio | None = None
    color_palette: ColorPalette | None = None
    image_weight: Annotated[StrictInt, Field(ge=1, le=100)] = 50
    magic_prompt_option: Literal["AUTO", "ON", "OFF"] | None = None
    model: Literal["V_1", "V_1_TURBO", "V_2", "V_2_TURBO"] = "V_2"
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_images: Annotated[StrictInt, Field(ge=1, le=8)] | None = None
    resolution: Annotated[str, AfterValidator(_resolution)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    style_type: Literal["AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME"] | None = (
        None
    )

    @model_validator(mode="before")
    @classmethod
    def _no_urls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [name for name in URL_FIELDS if name in data]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: not taken by provider {PROVIDER}, "
                    "which takes the source image as image_file only"
                )
        return data

    @model_validator(mode="after")
    def _aspect_or_resolution(self) -> IdeogramRemixRequest:
        if self.aspect_ratio is not None and self.resolution is not None:
            raise ValueError("aspect_ratio and resolution cannot be given together")
        return self

    def files(self) -> list[BlobRef]:
        """The source images given as files: the one image."""
        return [self.image_file]

    def stored(self) -> dict[str, Any]:
        """The request as a job keeps it (the same as :meth:`upstream_input`)."""
        return self.upstream_input()

    def upstream_input(self) -> dict[str, Any]:
        """The stored request: the ``image_request`` fields and the ``image_file`` reference."""
        return self.model_dump(mode="json", exclude_none=True)

    def image_request(self) -> dict[str, Any]:
        """The relay's ``image_request`` JSON object (everything but the image)."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"image_file"})
