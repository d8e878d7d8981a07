# Staged input becomes records (text) parsed by the workers, with keys staged
# beside them by the workers. What was staged before is carried over: each
# row as its JSON text (a JSON Lines record), and its key, with the key of a
# first occurrence whose row a finished partition already deleted, so that
# repeats across partitions are still found; the partitions count as keyed.

import json

import django.db.models.deletion
from django.db import migrations, models

BATCH = 5000


def carry_over(apps, schema_editor):
    StagedRow = apps.get_model("jobs", "StagedRow")
    StagedRecord = apps.get_model("jobs", "StagedRecord")
    StagedKey = apps.get_model("jobs", "StagedKey")
    JobPartition = apps.get_model("jobs", "JobPartition")
    using = schema_editor.connection.alias
    rows = StagedRow.objects.using(using).order_by("job_id", "number")
    records, keys, firsts = [], {}, {}
    for row in rows.iterator(chunk_size=BATCH):
        record = "" if row.refused is not None else json.dumps(row.data)
        records.append(
            StagedRecord(job_id=row.job_id, number=row.number, record=record, refused=row.refused)
        )
        if row.key:
            keys[row.job_id, row.number] = row.key
            if row.first is not None:
                firsts[row.job_id, row.first] = row.key
        if len(records) == BATCH:
            StagedRecord.objects.using(using).bulk_create(records)
            records = []
    StagedRecord.objects.using(using).bulk_create(records)
    keys = firsts | keys
    StagedKey.objects.using(using).bulk_create(
        (StagedKey(job_id=job, number=number, key=key) for (job, number), key in keys.items()),
        batch_size=BATCH,
    )
    JobPartition.objects.using(using).update(keyed=True)


def refuse_with_staged_input(apps, schema_editor):
    StagedRecord = apps.get_model("jobs", "StagedRecord")
    if StagedRecord.objects.using(schema_editor.connection.alias).exists():
        raise RuntimeError(
            "jobs 0005 cannot be reversed while jobs have staged input: let them end, or "
            "delete them, first"
        )


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0004_held_jobs'),
    ]

    operations = [
        migrations.AddField(
            model_name='job',
            name='columns',
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='job',
            name='input_format',
            field=models.CharField(default='jsonl', max_length=8),
        ),
        migrations.AddField(
            model_name='jobpartition',
            name='keyed',
            field=models.BooleanField(default=False),
        ),
        migrations.CreateModel(
            name='StagedRecord',
            fields=[
                ('pk', models.CompositePrimaryKey('job_id', 'number', blank=True, editable=False, primary_key=True, serialize=False)),
                ('job', models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='jobs.job')),
                ('number', models.PositiveBigIntegerField()),
                ('record', models.TextField(blank=True)),
                ('refused', models.JSONField(blank=True, null=True)),
            ],
        ),
        migrations.CreateModel(
            name='StagedKey',
            fields=[
                ('pk', models.CompositePrimaryKey('job_id', 'number', blank=True, editable=False, primary_key=True, serialize=False)),
                ('job', models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='jobs.job')),
                ('number', models.PositiveBigIntegerField()),
                ('key', models.TextField()),
            ],
            options={
                'indexes': [models.Index(fields=['job', 'key', 'number'], name='jobkey_job_key_number_idx')],
            },
        ),
        migrations.RunPython(carry_over, refuse_with_staged_input, elidable=True),
        migrations.DeleteModel(
            name='StagedRow',
        ),
    ]
