"""The dropin that lets mim-twisted find the entity_time extension (twisted.plugin)."""

from mim_entity_time import EntityTime

entity_time = EntityTime()
