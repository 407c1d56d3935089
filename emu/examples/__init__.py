"""Example "modules" written against emu's kernel API."""
