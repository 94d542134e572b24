from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0013_preset"),
    ]

    operations = [
        migrations.AlterField(
            model_name="generation",
            name="source",
            field=models.CharField(
                choices=[
                    ("chat", "Chat"),
                    ("job", "Job"),
                    ("api", "API"),
                    ("batch", "Batch"),
                    ("import", "Imported"),
                ],
                default="chat",
                max_length=8,
            ),
        ),
    ]
