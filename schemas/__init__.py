"""Contracts shared by every layer: params (pydantic), frames (pandera), manifests."""
