"""Writes that the ORM would spread over several round trips."""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import AutoField, Model
from django.db.models.expressions import RawSQL
from django.db.models.sql import InsertQuery


def insert_together(groups: list[list[Model]], using: str = DEFAULT_DB_ALIAS) -> None:
    """Insert new, linked rows at once: each group is a list of unsaved instances of
    one model, inserted in its order; a foreign key to an instance of an earlier group
    gets that instance's new id.

    On PostgreSQL this is one statement (data-modifying WITH queries, the later ones
    reading the ids the earlier ones return): one round trip, and atomic without a
    transaction around it. Elsewhere, bulk_create per group inside a transaction.
    As with bulk_create, no save signals are sent. Each instance gets its pk and is
    then saved as far as Django knows."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        with transaction.atomic(using=using):
            for objs in groups:
                type(objs[0]).objects.using(using).bulk_create(objs)
        return
    links = []  # (instance, field, target), to restore once the ids are known
    try:
        rows = _insert(connection, groups, links)
    except Exception:
        for obj, field, target in links:  # as they were: nothing was inserted
            setattr(obj, field.attname, None)
            field.set_cached_value(obj, target)
        raise
    ids: list[list] = [[] for _ in groups]
    for index, pk in rows:
        ids[index].append(pk)
    for objs, new_ids in zip(groups, ids, strict=True):
        # One INSERT's rows take the sequence's values in the order of its VALUES.
        for obj, pk in zip(objs, sorted(new_ids), strict=True):
            obj.pk = pk
            obj._state.adding = False
            obj._state.db = using
    for obj, field, target in links:
        setattr(obj, field.attname, target.pk)
        field.set_cached_value(obj, target)


def _insert(connection, groups: list[list[Model]], links: list) -> list[tuple]:
    """Build and run insert_together's statement; returns (group index, id) rows.
    Appends to `links` each foreign key it points at an earlier group's WITH query."""
    using = connection.alias
    qn = connection.ops.quote_name
    ctes, params = [], []
    group_of: dict[int, int] = {}  # id(instance) -> the index of its group
    for index, objs in enumerate(groups):
        model = type(objs[0])
        opts = model._meta
        fields = [f for f in opts.concrete_fields if not f.generated]
        fields = [f for f in fields if not isinstance(f, AutoField)]
        for obj in objs:
            if type(obj) is not model or obj.pk is not None:
                raise ValueError(f"group {index}: new instances of one model only ({obj!r})")
            for field in fields:
                if not field.is_relation or not field.is_cached(obj):
                    continue
                target = field.get_cached_value(obj)
                if target is None or target.pk is not None:
                    continue
                if id(target) not in group_of:
                    raise ValueError(f"{obj!r}.{field.name} is an instance not inserted before it")
                if len(groups[group_of[id(target)]]) != 1:
                    raise ValueError(f"{obj!r}.{field.name}: its target's group must hold only it")
                links.append((obj, field, target))
                pk_column = qn(target._meta.pk.column)
                source = f"(SELECT {pk_column} FROM inserted_{group_of[id(target)]})"
                # Setting the id drops the cached instance; it comes back afterwards.
                setattr(obj, field.attname, RawSQL(source, ()))
            group_of[id(obj)] = index
        query = InsertQuery(model)
        query.insert_values(fields, objs)
        compiler = query.get_compiler(using=using)
        compiler.returning_fields = [opts.pk]
        ((sql, sql_params),) = compiler.as_sql()
        ctes.append(f"inserted_{index} AS ({sql})")
        params.extend(sql_params)
    pk_columns = [qn(type(objs[0])._meta.pk.column) for objs in groups]
    select = " UNION ALL ".join(
        f"SELECT {index}, {column} FROM inserted_{index}" for index, column in enumerate(pk_columns)
    )
    with connection.cursor() as cursor:
        cursor.execute(f"WITH {', '.join(ctes)} {select}", params)
        return cursor.fetchall()
