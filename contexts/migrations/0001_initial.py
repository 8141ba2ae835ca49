import django.db.models.deletion
import uuid
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('agents', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='ContextEntry',
            fields=[
                ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ('context_type', models.CharField(choices=[('task_result', 'Task Result'), ('state_update', 'State Update'), ('error', 'Error'), ('metadata', 'Metadata')], max_length=16)),
                ('key', models.CharField(blank=True, max_length=200, null=True)),
                ('payload', models.JSONField()),
                ('tags', models.JSONField(blank=True, default=list)),
                ('version', models.PositiveIntegerField(default=1)),
                ('ttl_seconds', models.PositiveIntegerField(blank=True, null=True)),
                ('created_at', models.DateTimeField()),
                ('updated_at', models.DateTimeField()),
                ('expires_at', models.DateTimeField(blank=True, null=True)),
                ('owner', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='context_entries', to='agents.agent')),
            ],
            options={
                'verbose_name': 'context entry',
                'verbose_name_plural': 'context entries',
                'ordering': ['-updated_at', '-id'],
            },
        ),
        migrations.CreateModel(
            name='ContextTag',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('tag', models.CharField(max_length=64)),
                ('context_type', models.CharField(choices=[('task_result', 'Task Result'), ('state_update', 'State Update'), ('error', 'Error'), ('metadata', 'Metadata')], max_length=16)),
                ('updated_at', models.DateTimeField()),
                ('expires_at', models.DateTimeField(blank=True, null=True)),
                ('entry', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='tag_rows', to='contexts.contextentry')),
            ],
        ),
        migrations.CreateModel(
            name='ContextVersion',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('version', models.PositiveIntegerField()),
                ('payload', models.JSONField()),
                ('tags', models.JSONField(default=list)),
                ('ttl_seconds', models.PositiveIntegerField(blank=True, null=True)),
                ('updated_at', models.DateTimeField()),
                ('entry', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='versions', to='contexts.contextentry')),
            ],
            options={
                'ordering': ['-version'],
            },
        ),
        migrations.AddIndex(
            model_name='contextentry',
            index=models.Index(fields=['updated_at', 'id', 'expires_at'], name='context_recent_idx'),
        ),
        migrations.AddIndex(
            model_name='contextentry',
            index=models.Index(fields=['owner', 'updated_at', 'id', 'expires_at'], name='context_owner_idx'),
        ),
        migrations.AddIndex(
            model_name='contextentry',
            index=models.Index(fields=['owner', 'context_type', 'updated_at', 'id', 'expires_at'], name='context_owner_type_idx'),
        ),
        migrations.AddIndex(
            model_name='contextentry',
            index=models.Index(fields=['context_type', 'updated_at', 'id', 'expires_at'], name='context_type_idx'),
        ),
        migrations.AddIndex(
            model_name='contextentry',
            index=models.Index(condition=models.Q(('key__isnull', False)), fields=['key', 'updated_at', 'id', 'expires_at'], name='context_key_idx'),
        ),
        migrations.AddIndex(
            model_name='contextentry',
            index=models.Index(condition=models.Q(('expires_at__isnull', False)), fields=['expires_at'], name='context_expiry_idx'),
        ),
        migrations.AddConstraint(
            model_name='contextentry',
            constraint=models.UniqueConstraint(condition=models.Q(('key__isnull', False)), fields=('owner', 'key'), name='context_key_per_owner'),
        ),
        migrations.AddIndex(
            model_name='contexttag',
            index=models.Index(fields=['tag', 'updated_at', 'entry', 'expires_at'], name='context_tag_idx'),
        ),
        migrations.AddIndex(
            model_name='contexttag',
            index=models.Index(fields=['tag', 'context_type', 'updated_at', 'entry', 'expires_at'], name='context_tag_type_idx'),
        ),
        migrations.AddConstraint(
            model_name='contexttag',
            constraint=models.UniqueConstraint(fields=('entry', 'tag'), name='context_tag_unique'),
        ),
        migrations.AddConstraint(
            model_name='contextversion',
            constraint=models.UniqueConstraint(fields=('entry', 'version'), name='context_version_unique'),
        ),
    ]
