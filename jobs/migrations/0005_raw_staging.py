# Staged input becomes records (text) parsed by the workers, with keys staged
# beside them by the workers; the rows staged before are carried over as
# their JSON text (a JSON Lines record), to be keyed again by their workers.

import json

import django.db.models.deletion
from django.db import migrations, models


def carry_over(apps, schema_editor):
    StagedRow = apps.get_model("jobs", "StagedRow")
    StagedRecord = apps.get_model("jobs", "StagedRecord")
    using = schema_editor.connection.alias
    rows = StagedRow.objects.using(using).order_by().values_list("job_id", "number", "data", "refused")
    batch = []
    for job_id, number, data, refused in rows.iterator(chunk_size=5000):
        record = "" if refused is not None else json.dumps(data)
        batch.append(StagedRecord(job_id=job_id, number=number, record=record, refused=refused))
        if len(batch) == 5000:
            StagedRecord.objects.using(using).bulk_create(batch)
            batch = []
    StagedRecord.objects.using(using).bulk_create(batch)


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
        migrations.RunPython(carry_over, migrations.RunPython.noop, elidable=True),
        migrations.DeleteModel(
            name='StagedRow',
        ),
    ]
