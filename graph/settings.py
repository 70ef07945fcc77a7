"""One settings object, validated at start-up by the CLI or API and passed in.

Library code never reads the environment; `Settings()` does (prefix `CHANNELGRAPH_`), and
Neo4j credentials also come from `NEO4J_USER` / `NEO4J_PASSWORD` as the Neo4j tools use.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

NEO4J_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHANNELGRAPH_", extra="ignore")

    store: Path = Path("channelgraph-data")
    neo4j: str | None = Field(default=None, validation_alias=AliasChoices("neo4j", "CHANNELGRAPH_NEO4J", "NEO4J_URI"))
    neo4j_user: str = Field(default="neo4j", validation_alias=AliasChoices("neo4j_user", "CHANNELGRAPH_NEO4J_USER", "NEO4J_USER", "NEO4J_USERNAME"))
    neo4j_password: SecretStr | None = Field(default=None, validation_alias=AliasChoices("neo4j_password", "CHANNELGRAPH_NEO4J_PASSWORD", "NEO4J_PASSWORD"))
    neo4j_database: str | None = None
    neo4j_batch_size: int = 10_000
    neo4j_retry_seconds: float = 30.0  # how long a transaction is retried while Neo4j is unavailable
    api_key: SecretStr | None = None
    api_max_body_bytes: int = 64 << 20  # larger request bodies get 413
    k: int = Field(default=3, ge=1)  # consumer scans per case that confirm a suspected diversion
    rebate_policy: Path | None = None  # rebate policy file (TOML) for the API's rebates view

    @field_validator("neo4j")
    @classmethod
    def _known_scheme(cls, uri: str | None) -> str | None:
        if uri is not None and uri.split("://", 1)[0] not in NEO4J_SCHEMES:
            raise ValueError(f"{uri!r}: a Neo4j URI starts with one of {', '.join(s + '://' for s in NEO4J_SCHEMES)}")
        return uri
